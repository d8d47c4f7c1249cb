/*
 * memcheck: a multi-threaded target that checks its own memory, for the
 * fault-injection tests (a checkpoint taken around an engine killed at any
 * point must restore exactly this memory).
 *
 *   memcheck MIB WRITERS [PAUSE_US]
 *
 * A region of MIB MiB of anonymous memory; every page holds its index, its
 * generation and a pattern derived from both; the generations live in a
 * separate table. WRITERS threads (each owning the pages i % WRITERS == k)
 * rewrite random pages of theirs while running (one page every PAUSE_US
 * microseconds, or flat out when 0); a churn thread, when on,
 * maps, fills and unmaps 1-4 MiB buffers in a loop (as numpy or glibc's
 * mmap'ed mallocs do), so pages vanish under a pre-dump that reads them
 * after the thaw.
 *
 * Commands on stdin, one a line, each answered with one line on stdout:
 *   run          writers (and churn, if on) go; "running"
 *   pause        they stop at a consistent point; "paused"
 *   churn on|off the churn thread takes part in run/pause; "churn on|off"
 *   w SEED N     the main thread rewrites N pages chosen by SEED; "ok"
 *   check        every page against its generation; "good PAGES" or "bad IDX"
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define PS 4096

static uint8_t *region;
static uint32_t *gens;
static size_t npages;
static int nwriters;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static int running, churn_on, idle_count;
static long pause_us;

static uint64_t mix(uint64_t x)
{
	x ^= x >> 33;
	x *= 0xff51afd7ed558ccdULL;
	x ^= x >> 33;
	x *= 0xc4ceb9fe1a85ec53ULL;
	return x ^ (x >> 33);
}

static void fill_page(size_t i, uint32_t gen)
{
	uint64_t *p = (uint64_t *)(region + i * PS);
	uint64_t seed = mix(((uint64_t)i << 32) | gen);
	p[0] = i;
	p[1] = gen;
	for (int k = 2; k < PS / 8; k++)
		p[k] = seed + (uint64_t)k * 0x9e3779b97f4a7c15ULL;
}

static long check_page(size_t i)
{
	uint64_t *p = (uint64_t *)(region + i * PS);
	uint64_t seed = mix(((uint64_t)i << 32) | gens[i]);
	if (p[0] != i || p[1] != gens[i])
		return 0;
	for (int k = 2; k < PS / 8; k++)
		if (p[k] != seed + (uint64_t)k * 0x9e3779b97f4a7c15ULL)
			return 0;
	return 1;
}

static void rewrite(size_t i)
{
	gens[i]++;
	fill_page(i, gens[i]);
}

/* Wait while paused; 0 when this thread may take one more step. */
static void gate(int churner)
{
	pthread_mutex_lock(&mu);
	while (!running || (churner && !churn_on)) {
		idle_count++;
		pthread_cond_broadcast(&cv);
		pthread_cond_wait(&cv, &mu);
		idle_count--;
	}
	pthread_mutex_unlock(&mu);
}

static void *writer(void *arg)
{
	long k = (long)arg;
	uint64_t r = mix(k + 1);
	for (;;) {
		gate(0);
		for (int n = 0; n < (pause_us ? 1 : 64); n++) {
			r = mix(r);
			size_t i = (r % (npages / nwriters)) * nwriters + k;
			if (i < npages)
				rewrite(i);
		}
		if (pause_us)
			usleep(pause_us);
	}
	return NULL;
}

static void *churner(void *arg)
{
	uint64_t r = 12345;
	(void)arg;
	for (;;) {
		gate(1);
		r = mix(r);
		size_t len = (1 + r % 4) << 20;
		uint8_t *b = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		if (b == MAP_FAILED)
			continue;
		memset(b, (int)(r & 0xff) | 1, len);
		munmap(b, len);
	}
	return NULL;
}

static void pause_all(void)
{
	pthread_mutex_lock(&mu);
	running = 0;
	pthread_cond_broadcast(&cv);
	while (idle_count < nwriters + 1)
		pthread_cond_wait(&cv, &mu);
	pthread_mutex_unlock(&mu);
}

int main(int argc, char **argv)
{
	size_t mib = argc > 1 ? strtoul(argv[1], NULL, 0) : 16;
	char line[128];
	nwriters = argc > 2 ? atoi(argv[2]) : 2;
	pause_us = argc > 3 ? atol(argv[3]) : 0;
	if (nwriters < 1)
		nwriters = 1;
	npages = mib * 256;
	region = mmap(NULL, npages * PS, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	gens = calloc(npages, sizeof *gens);
	if (region == MAP_FAILED || !gens)
		return 1;
	for (size_t i = 0; i < npages; i++)
		fill_page(i, 0);
	for (long k = 0; k < nwriters; k++) {
		pthread_t t;
		pthread_create(&t, NULL, writer, (void *)k);
	}
	pthread_t c;
	pthread_create(&c, NULL, churner, NULL);
	pause_all();
	printf("READY %d %p %zu\n", getpid(), (void *)region, npages);
	fflush(stdout);
	while (fgets(line, sizeof line, stdin)) {
		unsigned long seed, n;
		if (!strncmp(line, "run", 3)) {
			pthread_mutex_lock(&mu);
			running = 1;
			pthread_cond_broadcast(&cv);
			pthread_mutex_unlock(&mu);
			puts("running");
		} else if (!strncmp(line, "pause", 5)) {
			pause_all();
			puts("paused");
		} else if (!strncmp(line, "churn on", 8) || !strncmp(line, "churn off", 9)) {
			pthread_mutex_lock(&mu);
			churn_on = line[7] == 'n';
			pthread_cond_broadcast(&cv);
			pthread_mutex_unlock(&mu);
			printf("churn %s\n", churn_on ? "on" : "off");
		} else if (sscanf(line, "w %lu %lu", &seed, &n) == 2) {
			uint64_t r = mix(seed);
			for (unsigned long j = 0; j < n; j++) {
				r = mix(r);
				rewrite(r % npages);
			}
			puts("ok");
		} else if (!strncmp(line, "check", 5)) {
			size_t bad = npages;
			for (size_t i = 0; i < npages && bad == npages; i++)
				if (!check_page(i))
					bad = i;
			if (bad == npages)
				printf("good %zu\n", npages);
			else
				printf("bad %zu\n", bad);
		} else {
			puts("?");
		}
		fflush(stdout);
	}
	return 0;
}
