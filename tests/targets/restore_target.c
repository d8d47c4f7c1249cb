/*
 * A multi-threaded target that proves its own state after dump -> kill ->
 * restore. argv[1]: a directory to chdir into; argv[2]: a data file.
 *
 * State it sets up: a 16 MiB buffer with a pattern (plus pages rewritten by
 * "write" commands, logged so the check knows the newest content); the data
 * file open O_RDWR at offset 1234 and O_APPEND; a pipe holding 3000 unread
 * bytes; a file mapping of the data file (private); a SIGUSR1 handler that
 * counts; SIGUSR2 blocked in the main thread; 5 threads: two tickers in
 * nanosleep, one in futex wait, one blocked in read on a pipe fed by the
 * main thread, one FPU spinner.
 *
 * stdin commands (one line each, answered by one line):
 *   write N      rewrite page N of the buffer with a new value -> "OK"
 *   check        verify everything that must survive -> "CHECK errors=E ticks=..."
 *   pipe         read the 3000 bytes of the pipe and check them -> "PIPE ok|bad"
 *   quit         exit 0
 * Every broken invariant prints "ERR <what>" before the answer line.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/futex.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define BUF (16 << 20)
#define PAGE 4096
static unsigned char *buf;
static unsigned char gen[BUF / PAGE];
static int datafd, appendfd, shfd, pipefd[2], feedpipe[2];
static char *fmap, *shmap;
static char want_cwd[4096];
static atomic_long ticks[5], usr1;
static atomic_int fword;
static int errors;
static pthread_t threads[5];

static void err(const char *what, long v)
{
	errors++;
	printf("ERR %s %ld\n", what, v);
}

static void fill_page(size_t p, unsigned char g)
{
	for (size_t i = 0; i < PAGE; i++)
		buf[p * PAGE + i] = (unsigned char)(p * 31 + i * 7 + g * 13);
}

static int page_ok(size_t p)
{
	for (size_t i = 0; i < PAGE; i++)
		if (buf[p * PAGE + i] != (unsigned char)(p * 31 + i * 7 + gen[p] * 13))
			return 0;
	return 1;
}

static void on_usr1(int s)
{
	(void)s;
	usr1++;
}

static void *ticker(void *a)
{
	long k = (long)a;
	for (;;) {
		struct timespec ts = { 0, 20 * 1000 * 1000 };
		nanosleep(&ts, NULL); /* EINTR after restore is allowed */
		ticks[k]++;
	}
	return NULL;
}

static void *waiter(void *a)
{
	(void)a;
	for (;;) {
		int seen = atomic_load(&fword);
		syscall(SYS_futex, &fword, FUTEX_WAIT_PRIVATE, seen, NULL, NULL, 0);
		ticks[2]++;
	}
	return NULL;
}

static void *reader(void *a)
{
	uint32_t v, expect = 0;
	(void)a;
	for (;;) {
		long r = read(feedpipe[0], &v, sizeof v);
		if (r == sizeof v) {
			if (v != expect)
				err("feed sequence", v);
			expect = v + 1;
			ticks[3]++;
		} else if (r < 0 && errno != EINTR) {
			err("feed read", errno);
		}
	}
	return NULL;
}

static void *spinner(void *a)
{
	long i = 0;
	double d = 0;
	(void)a;
	for (;;) {
		for (int k = 0; k < 200000; k++) {
			i++;
			d += 1.0;
		}
		if ((double)i != d)
			err("fpu", i);
		ticks[4]++;
	}
	return NULL;
}

static void feed(void)
{
	static uint32_t seq;
	if (write(feedpipe[1], &seq, sizeof seq) == sizeof seq)
		seq++;
	atomic_fetch_add(&fword, 1);
	syscall(SYS_futex, &fword, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
}

static void check(void)
{
	long before[5], after[5];
	struct sigaction sa;
	sigset_t cur;
	char cwd[4096];

	for (size_t p = 0; p < BUF / PAGE; p++)
		if (!page_ok(p)) {
			err("page content", (long)p);
			break;
		}
	if (lseek(datafd, 0, SEEK_CUR) != 1234)
		err("data file offset", lseek(datafd, 0, SEEK_CUR));
	if (!(fcntl(appendfd, F_GETFL) & O_APPEND))
		err("O_APPEND lost", 0);
	if (fmap[0] != 'D' || fmap[4096] != 'E')
		err("file mapping", fmap[0]);
	/* the shared mapping still writes through to the file */
	char back = 0;
	shmap[1] = (char)(shmap[1] + 1);
	if (pread(shfd, &back, 1, 1) != 1 || back != shmap[1])
		err("shared file mapping not shared", back);
	sigaction(SIGUSR1, NULL, &sa);
	if (sa.sa_handler != on_usr1)
		err("SIGUSR1 handler", 0);
	pthread_sigmask(SIG_BLOCK, NULL, &cur);
	if (!sigismember(&cur, SIGUSR2))
		err("SIGUSR2 not blocked", 0);
	if (!getcwd(cwd, sizeof cwd) || strcmp(cwd, want_cwd))
		err("cwd", 0);
	for (int i = 0; i < 5; i++) {
		if (pthread_kill(threads[i], 0))
			err("pthread_kill (stale TID?)", i);
		before[i] = ticks[i];
	}
	long u = usr1;
	kill(getpid(), SIGUSR1);
	for (int k = 0; k < 20; k++) {
		struct timespec ts = { 0, 10 * 1000 * 1000 };
		feed();
		nanosleep(&ts, NULL);
	}
	if (usr1 != u + 1)
		err("SIGUSR1 not delivered", usr1);
	for (int i = 0; i < 5; i++) {
		after[i] = ticks[i];
		if (after[i] <= before[i])
			err("thread not ticking", i);
	}
	sigset_t pend;
	sigpending(&pend);
	printf("CHECK errors=%d ticks=%ld,%ld,%ld,%ld,%ld pid=%d pending_usr2=%d\n", errors,
	       after[0], after[1], after[2], after[3], after[4], getpid(),
	       sigismember(&pend, SIGUSR2));
}

int main(int argc, char **argv)
{
	char line[128];
	sigset_t s2;

	if (argc < 3 || chdir(argv[1]) || !getcwd(want_cwd, sizeof want_cwd))
		return 2;
	buf = mmap(NULL, BUF, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	for (size_t p = 0; p < BUF / PAGE; p++)
		fill_page(p, 0);
	datafd = open(argv[2], O_RDWR);
	appendfd = open(argv[2], O_WRONLY | O_APPEND);
	if (datafd < 0 || appendfd < 0 || lseek(datafd, 1234, SEEK_SET) != 1234)
		return 3;
	fmap = mmap(NULL, 2 * PAGE, PROT_READ, MAP_PRIVATE, datafd, 0);
	/* a file of its own (in the work dir) mapped shared and writable */
	shfd = open("shared.bin", O_RDWR | O_CREAT, 0600);
	if (shfd < 0 || ftruncate(shfd, PAGE))
		return 6;
	shmap = mmap(NULL, PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, shfd, 0);
	if (fmap == MAP_FAILED || shmap == MAP_FAILED || pipe(pipefd) || pipe(feedpipe))
		return 4;
	for (int i = 0; i < 3000; i++) {
		char c = (char)(i % 251);
		if (write(pipefd[1], &c, 1) != 1)
			return 5;
	}
	signal(SIGUSR1, on_usr1);
	sigemptyset(&s2);
	sigaddset(&s2, SIGUSR2);
	pthread_create(&threads[0], NULL, ticker, (void *)0);
	pthread_create(&threads[1], NULL, ticker, (void *)1);
	pthread_create(&threads[2], NULL, waiter, NULL);
	pthread_create(&threads[3], NULL, reader, NULL);
	pthread_create(&threads[4], NULL, spinner, NULL);
	pthread_sigmask(SIG_BLOCK, &s2, NULL);
	printf("READY %d\n", getpid());
	fflush(stdout);
	while (fgets(line, sizeof line, stdin)) {
		long n;
		if (sscanf(line, "write %ld", &n) == 1) {
			gen[n]++;
			fill_page((size_t)n, gen[n]);
			printf("OK\n");
		} else if (!strncmp(line, "check", 5)) {
			check();
		} else if (!strncmp(line, "pipe", 4)) {
			char got[3000];
			size_t have = 0;
			int bad = 0;
			while (have < sizeof got) {
				long r = read(pipefd[0], got + have, sizeof got - have);
				if (r <= 0)
					break;
				have += r;
			}
			for (size_t i = 0; i < sizeof got; i++)
				if (have != sizeof got || got[i] != (char)(i % 251))
					bad = 1;
			printf("PIPE %s\n", bad ? "bad" : "ok");
		} else if (!strncmp(line, "quit", 4)) {
			return 0;
		} else {
			printf("ERR unknown command\n");
		}
		fflush(stdout);
	}
	return 0;
}
