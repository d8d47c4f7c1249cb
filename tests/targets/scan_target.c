/*
 * Target for the PAGEMAP_SCAN and tracker tests, driven over stdin/stdout.
 * Every command answers one line, "OK ..." or "ERR ...".
 *
 *   map anon|shared|memfd|thp N     -> "MAP id addr"      (N pages)
 *   map file PATH N                  -> "MAP id addr"      (private, rw)
 *   map fixed ID                     -> "MAP id addr"      (new anon over ID, MAP_FIXED)
 *   unmap ID
 *   w ID I [J [STEP]]   write pages I..J-1 (every STEP-th) with a new value
 *   wl ID I1 I2 ...     write the listed pages
 *   r ID I [J [STEP]]   read pages (fault them in without writing)
 *   z ID I [J]          MADV_DONTNEED pages I..J-1
 *   free ID I [J]       MADV_FREE
 *   prot ID I J P       mprotect pages I..J-1 to P (0 none, 1 r, 3 rw)
 *   uffd ID             register mapping ID on this process's WP_ASYNC uffd (kept open)
 *   racer ID            start a thread writing random pages of ID, logging each write
 *                       -> "OK counter=ADDR log=ADDR max=N"
 *   stop                stop the racer -> "OK writes"
 * On start it prints "READY pid=PID page=4096".
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#ifndef UFFD_FEATURE_WP_UNPOPULATED
#define UFFD_FEATURE_WP_UNPOPULATED (1 << 13)
#endif
#ifndef UFFD_FEATURE_WP_ASYNC
#define UFFD_FEATURE_WP_ASYNC (1 << 15)
#endif
#ifndef UFFD_FEATURE_WP_HUGETLBFS_SHMEM
#define UFFD_FEATURE_WP_HUGETLBFS_SHMEM (1 << 12)
#endif
#ifndef MADV_FREE
#define MADV_FREE 8
#endif

#define MAXMAP 64
#define LOGMAX (1 << 20)
static char *maps[MAXMAP];
static size_t npages[MAXMAP];
static int nmaps;
static long ps;
static uint64_t gen;
static int uffd = -1;

static volatile uint64_t racer_counter;
static uint32_t racer_log[LOGMAX];
static volatile int racer_stop;
static pthread_t racer;
static int racer_id = -1;

static int new_map(char *m, size_t n)
{
	if (m == MAP_FAILED) {
		printf("ERR mmap %s\n", strerror(errno));
		return -1;
	}
	maps[nmaps] = m;
	npages[nmaps] = n;
	printf("MAP %d %p\n", nmaps, (void *)m);
	return nmaps++;
}

static void *racer_main(void *arg)
{
	char *base = maps[racer_id];
	size_t n = npages[racer_id];
	uint64_t x = 88172645463325252ull;
	(void)arg;
	while (!racer_stop && racer_counter < LOGMAX) {
		x ^= x << 13; x ^= x >> 7; x ^= x << 17;
		uint32_t p = x % n;
		((volatile uint64_t *)(base + p * ps))[1] = racer_counter;
		racer_log[racer_counter] = p;
		__atomic_store_n(&racer_counter, racer_counter + 1, __ATOMIC_RELEASE);
		for (volatile int k = 0; k < 3000; k++)
			;
	}
	return NULL;
}

static int do_uffd(int id)
{
	if (uffd < 0) {
		uffd = syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK | 1 /* UFFD_USER_MODE_ONLY */);
		if (uffd < 0)
			return -1;
		struct uffdio_api api = { .api = UFFD_API,
			.features = UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED |
				    UFFD_FEATURE_WP_HUGETLBFS_SHMEM };
		if (ioctl(uffd, UFFDIO_API, &api))
			return -1;
	}
	struct uffdio_register reg = { .range = { (uint64_t)maps[id], npages[id] * ps },
				       .mode = UFFDIO_REGISTER_MODE_WP };
	return ioctl(uffd, UFFDIO_REGISTER, &reg);
}

int main(void)
{
	char line[1 << 17], *tok, *save;
	ps = sysconf(_SC_PAGESIZE);
	setvbuf(stdout, NULL, _IOLBF, 0);
	printf("READY pid=%d page=%ld\n", getpid(), ps);
	while (fgets(line, sizeof line, stdin)) {
		char *cmd = strtok_r(line, " \n", &save);
		if (!cmd)
			continue;
		if (!strcmp(cmd, "map")) {
			char *kind = strtok_r(NULL, " \n", &save);
			if (!strcmp(kind, "fixed")) {
				int id = atoi(strtok_r(NULL, " \n", &save));
				new_map(mmap(maps[id], npages[id] * ps, PROT_READ | PROT_WRITE,
					     MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0), npages[id]);
				continue;
			}
			if (!strcmp(kind, "file")) {
				char *path = strtok_r(NULL, " \n", &save);
				size_t n = strtoul(strtok_r(NULL, " \n", &save), NULL, 0);
				int fd = open(path, O_RDONLY);
				new_map(mmap(NULL, n * ps, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0), n);
				close(fd);
				continue;
			}
			size_t n = strtoul(strtok_r(NULL, " \n", &save), NULL, 0);
			if (!strcmp(kind, "anon")) {
				new_map(mmap(NULL, n * ps, PROT_READ | PROT_WRITE,
					     MAP_PRIVATE | MAP_ANONYMOUS, -1, 0), n);
			} else if (!strcmp(kind, "shared")) {
				new_map(mmap(NULL, n * ps, PROT_READ | PROT_WRITE,
					     MAP_SHARED | MAP_ANONYMOUS, -1, 0), n);
			} else if (!strcmp(kind, "memfd")) {
				int fd = memfd_create("scan-target", MFD_CLOEXEC);
				if (ftruncate(fd, n * ps))
					perror("ftruncate");
				new_map(mmap(NULL, n * ps, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0), n);
				close(fd);
			} else if (!strcmp(kind, "thp")) {
				size_t huge = 2 << 20;
				char *m = mmap(NULL, n * ps + huge, PROT_READ | PROT_WRITE,
					       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
				char *a = (char *)(((uintptr_t)m + huge - 1) & ~(huge - 1));
				if (a > m)
					munmap(m, a - m);
				munmap(a + n * ps, (m + n * ps + huge) - (a + n * ps));
				madvise(a, n * ps, MADV_HUGEPAGE);
				new_map(a, n);
			} else {
				printf("ERR kind\n");
			}
			continue;
		}
		if (!strcmp(cmd, "stop")) {
			racer_stop = 1;
			if (racer_id >= 0)
				pthread_join(racer, NULL);
			racer_id = -1;
			printf("OK %llu\n", (unsigned long long)racer_counter);
			continue;
		}
		int id = atoi(strtok_r(NULL, " \n", &save));
		if (id < 0 || id >= nmaps) {
			printf("ERR id\n");
			continue;
		}
		char *m = maps[id];
		long a[4] = { 0, (long)npages[id], 1, 0 };
		if (!strcmp(cmd, "wl")) {
			while ((tok = strtok_r(NULL, " \n", &save)))
				((volatile uint64_t *)(m + atol(tok) * ps))[0] = ++gen;
			printf("OK\n");
			continue;
		}
		int na = 0;
		while (na < 4 && (tok = strtok_r(NULL, " \n", &save)))
			a[na++] = atol(tok);
		if (na == 1)
			a[1] = a[0] + 1;
		int rc = 0;
		if (!strcmp(cmd, "w")) {
			for (long i = a[0]; i < a[1]; i += a[2])
				((volatile uint64_t *)(m + i * ps))[0] = ++gen;
		} else if (!strcmp(cmd, "r")) {
			volatile uint64_t sum = 0;
			for (long i = a[0]; i < a[1]; i += a[2])
				sum += ((volatile uint64_t *)(m + i * ps))[0];
		} else if (!strcmp(cmd, "z")) {
			rc = madvise(m + a[0] * ps, (a[1] - a[0]) * ps, MADV_DONTNEED);
		} else if (!strcmp(cmd, "free")) {
			rc = madvise(m + a[0] * ps, (a[1] - a[0]) * ps, MADV_FREE);
		} else if (!strcmp(cmd, "prot")) {
			int p = a[2] == 0 ? PROT_NONE : a[2] == 1 ? PROT_READ : PROT_READ | PROT_WRITE;
			rc = mprotect(m + a[0] * ps, (a[1] - a[0]) * ps, p);
		} else if (!strcmp(cmd, "unmap")) {
			rc = munmap(m, npages[id] * ps);
		} else if (!strcmp(cmd, "uffd")) {
			rc = do_uffd(id);
		} else if (!strcmp(cmd, "racer")) {
			racer_id = id;
			racer_stop = 0;
			racer_counter = 0;
			rc = pthread_create(&racer, NULL, racer_main, NULL);
			if (!rc) {
				printf("OK counter=%p log=%p max=%d\n", (void *)&racer_counter,
				       (void *)racer_log, LOGMAX);
				continue;
			}
		} else {
			printf("ERR cmd %s\n", cmd);
			continue;
		}
		if (rc)
			printf("ERR %s\n", strerror(errno));
		else
			printf("OK\n");
	}
	return 0;
}
