/*
 * Benchmark workload: N MiB of memory, P% of its pages rewritten every
 * 100 ms (random pages), plus T idle threads. Content is compressible about
 * 2-3x (a low-entropy pseudo-random stream), like real heaps.
 *   workload MIB PERCENT [THREADS]     prints "READY pid" once filled
 */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

static uint64_t s = 88172645463325252ull;
static inline uint64_t rnd(void)
{
	s ^= s << 13;
	s ^= s >> 7;
	s ^= s << 17;
	return s;
}

static void fill(unsigned char *p, size_t n)
{
	uint64_t *q = (uint64_t *)p;
	for (size_t i = 0; i < n / 8; i++)
		q[i] = rnd() & 0x0f0f0f0f0f0f0f0full; /* 4 bits of entropy a byte */
}

static void *idle(void *a)
{
	(void)a;
	for (;;)
		pause();
	return NULL;
}

int main(int argc, char **argv)
{
	size_t mib = argc > 1 ? strtoul(argv[1], NULL, 0) : 256;
	double pct = argc > 2 ? atof(argv[2]) : 1.0;
	int threads = argc > 3 ? atoi(argv[3]) : 0;
	size_t n = mib << 20, pages = n / 4096;
	unsigned char *m = mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (m == MAP_FAILED)
		return 1;
	fill(m, n);
	for (int i = 0; i < threads; i++) {
		pthread_t t;
		pthread_create(&t, NULL, idle, NULL);
	}
	printf("READY %d\n", getpid());
	fflush(stdout);
	size_t per_tick = (size_t)(pages * pct / 100.0);
	for (;;) {
		for (size_t k = 0; k < per_tick; k++)
			fill(m + (rnd() % pages) * 4096, 4096);
		struct timespec ts = { 0, 100 * 1000 * 1000 };
		nanosleep(&ts, NULL);
	}
}
