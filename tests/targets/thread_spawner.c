/* Creates short-lived threads in a loop (2 at a time) so that a freeze races
 * with thread births and deaths. Prints "READY pid", then on "status" a
 * STATUS line with the number of threads joined and errors. */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

static atomic_long joined, errors;

static void *work(void *a)
{
	volatile long x = 0;
	for (long i = 0; i < 20000; i++)
		x += i;
	return a;
}

static void *spawner(void *a)
{
	(void)a;
	for (;;) {
		pthread_t t1, t2;
		void *r1, *r2;
		if (pthread_create(&t1, NULL, work, (void *)1) || pthread_create(&t2, NULL, work, (void *)2)) {
			atomic_fetch_add(&errors, 1);
			continue;
		}
		pthread_join(t1, &r1);
		pthread_join(t2, &r2);
		if (r1 != (void *)1 || r2 != (void *)2)
			atomic_fetch_add(&errors, 1);
		atomic_fetch_add(&joined, 2);
	}
	return NULL;
}

int main(void)
{
	char line[64];
	pthread_t t;
	pthread_create(&t, NULL, spawner, NULL);
	printf("READY %d\n", getpid());
	fflush(stdout);
	while (fgets(line, sizeof line, stdin)) {
		printf("STATUS joined=%ld errors=%ld\n", atomic_load(&joined), atomic_load(&errors));
		fflush(stdout);
		if (!strncmp(line, "quit", 4))
			break;
	}
	return 0;
}
