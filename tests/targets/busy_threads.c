/*
 * A multi-threaded target that checks itself: 10 threads, each parked in a
 * different state (nanosleep, blocked pipe read, futex wait, epoll_wait,
 * poll, user-space AVX and FPU spinners, a driver), so that a freeze can
 * catch every kind of interrupted syscall. Every thread reports:
 *   - a syscall that returned early (elapsed < requested) or with an error,
 *   - an -ERESTART* value (512..516) leaking into errno,
 *   - ymm8 or MXCSR (rounding mode) changing under it,
 *   - a double/long register invariant breaking,
 *   - its signal mask changing (a thread left with every signal blocked),
 * as an "ERR ..." line and in the error count.
 *
 * stdin commands: "status" prints a STATUS line, "quit" prints it and exits.
 * Real-time signal SIGRTMIN is counted by the main thread (queued: none may be
 * lost); all other threads block it.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fenv.h>
#include <linux/futex.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static atomic_long errors, sleeps, reads, futexes, epolls, polls, avx_loops, fpu_loops, sigs;
static atomic_int fword;
static int data_pipe[2], idle_pipe[2];

static void err(const char *what, long v)
{
	atomic_fetch_add(&errors, 1);
	printf("ERR %s %ld\n", what, v);
	fflush(stdout);
}

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static sigset_t worker_mask; /* every thread but main blocks SIGRTMIN only */

static void check_mask(void)
{
	sigset_t cur;
	pthread_sigmask(SIG_BLOCK, NULL, &cur);
	for (int s = 1; s < NSIG; s++)
		if (sigismember(&cur, s) != sigismember(&worker_mask, s)) {
			err("signal mask changed at signal", s);
			return;
		}
}

static void check_errno(const char *what, long ret)
{
	if (ret < 0 && errno >= 512 && errno <= 516)
		err("ERESTART leaked", errno);
	else if (ret < 0 && errno != EAGAIN)
		err(what, errno);
}

static void *sleeper(void *a)
{
	(void)a;
	for (;;) {
		struct timespec req = { 0, 30 * 1000 * 1000 }, rem;
		double t0 = now();
		long r = nanosleep(&req, &rem);
		double dt = now() - t0;
		check_errno("nanosleep", r);
		if (r == 0 && dt < 0.030)
			err("nanosleep returned early (us)", (long)(dt * 1e6));
		check_mask();
		atomic_fetch_add(&sleeps, 1);
	}
	return NULL;
}

static void *reader(void *a)
{
	uint32_t expect = 0, got;
	(void)a;
	for (;;) {
		long r = read(data_pipe[0], &got, sizeof got);
		if (r != sizeof got) {
			check_errno("read", r);
			if (r >= 0)
				err("short read", r);
			continue;
		}
		if (got != expect)
			err("pipe sequence broken", got);
		expect = got + 1;
		check_mask();
		atomic_fetch_add(&reads, 1);
	}
	return NULL;
}

static void *futex_waiter(void *a)
{
	(void)a;
	for (;;) {
		int seen = atomic_load(&fword);
		long r = syscall(SYS_futex, &fword, FUTEX_WAIT_PRIVATE, seen, NULL, NULL, 0);
		check_errno("futex", r);
		if (r == 0 && atomic_load(&fword) == seen)
			; /* spurious wake-ups are allowed by futex(2) */
		atomic_fetch_add(&futexes, 1);
	}
	return NULL;
}

static void *epoller(void *a)
{
	int ep = epoll_create1(0);
	struct epoll_event ev = { .events = EPOLLIN }, out;
	(void)a;
	epoll_ctl(ep, EPOLL_CTL_ADD, idle_pipe[0], &ev);
	for (;;) {
		double t0 = now();
		long r = epoll_wait(ep, &out, 1, 40);
		double dt = now() - t0;
		check_errno("epoll_wait", r);
		if (r > 0)
			err("epoll_wait: idle pipe readable", r);
		if (r == 0 && dt < 0.039)
			err("epoll_wait returned early (us)", (long)(dt * 1e6));
		atomic_fetch_add(&epolls, 1);
	}
	return NULL;
}

static void *poller(void *a)
{
	struct pollfd p = { .fd = idle_pipe[0], .events = POLLIN };
	(void)a;
	for (;;) {
		double t0 = now();
		long r = poll(&p, 1, 40);
		double dt = now() - t0;
		check_errno("poll", r);
		if (r > 0)
			err("poll: idle pipe readable", r);
		if (r == 0 && dt < 0.039)
			err("poll returned early (us)", (long)(dt * 1e6));
		check_mask();
		atomic_fetch_add(&polls, 1);
	}
	return NULL;
}

static void *avx_spinner(void *a)
{
	static const double pattern[4] = { 1.5, -2.25, 3.125, 1e300 };
	(void)a;
	fesetround(FE_UPWARD);
	for (;;) {
		unsigned long bad;
		/* ymm8 must keep the pattern across 2M iterations, whatever freezes happen */
		__asm__ volatile(
			"vmovupd (%[p]), %%ymm8\n\t"
			"mov $2000000, %%rcx\n"
			"1:\n\t"
			"vxorpd (%[p]), %%ymm8, %%ymm10\n\t"
			"vptest %%ymm10, %%ymm10\n\t"
			"jnz 2f\n\t"
			"dec %%rcx\n\t"
			"jnz 1b\n\t"
			"xor %[bad], %[bad]\n\t"
			"jmp 3f\n"
			"2:\n\t"
			"mov $1, %[bad]\n"
			"3:\n\t"
			"vzeroupper\n"
			: [bad] "=&r"(bad)
			: [p] "r"(pattern)
			: "rcx", "xmm8", "xmm10", "cc", "memory");
		if (bad)
			err("ymm8 changed", 0);
		if (fegetround() != FE_UPWARD)
			err("MXCSR rounding mode lost", fegetround());
		volatile double third = 1.0, three = 3.0;
		if (third / three <= 0.3333333333333333)
			err("rounding not upward", 0);
		check_mask();
		atomic_fetch_add(&avx_loops, 1);
	}
	return NULL;
}

static void *fpu_spinner(void *a)
{
	long i = 0;
	double d = 0;
	(void)a;
	for (;;) {
		for (int k = 0; k < 1000000; k++) {
			i++;
			d += 1.0;
		}
		if ((double)i != d)
			err("fpu invariant broken", i);
		check_mask();
		atomic_fetch_add(&fpu_loops, 1);
	}
	return NULL;
}

static void *driver(void *a)
{
	uint32_t seq = 0;
	(void)a;
	for (;;) {
		struct timespec req = { 0, 5 * 1000 * 1000 };
		while (nanosleep(&req, &req) && errno == EINTR)
			;
		if (write(data_pipe[1], &seq, sizeof seq) != sizeof seq)
			err("pipe write", errno);
		seq++;
		atomic_fetch_add(&fword, 1);
		syscall(SYS_futex, &fword, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
	}
	return NULL;
}

static void on_rt(int sig)
{
	(void)sig;
	atomic_fetch_add(&sigs, 1);
}

static void status(const char *tag)
{
	printf("%s errors=%ld sleeps=%ld reads=%ld futex=%ld epoll=%ld poll=%ld avx=%ld fpu=%ld sigs=%ld\n",
	       tag, atomic_load(&errors), atomic_load(&sleeps), atomic_load(&reads),
	       atomic_load(&futexes), atomic_load(&epolls), atomic_load(&polls),
	       atomic_load(&avx_loops), atomic_load(&fpu_loops), atomic_load(&sigs));
	fflush(stdout);
}

int main(void)
{
	void *(*fns[])(void *) = { sleeper, sleeper, reader, futex_waiter, epoller,
				   poller, avx_spinner, fpu_spinner, driver };
	sigset_t rt;
	struct sigaction sa = { .sa_handler = on_rt, .sa_flags = SA_RESTART };
	char line[64];

	if (pipe(data_pipe) || pipe(idle_pipe))
		return 1;
	sigemptyset(&rt);
	sigaddset(&rt, SIGRTMIN);
	worker_mask = rt;
	sigaction(SIGRTMIN, &sa, NULL);
	pthread_sigmask(SIG_BLOCK, &rt, NULL); /* inherited by every thread */
	for (size_t i = 0; i < sizeof fns / sizeof fns[0]; i++) {
		pthread_t t;
		pthread_create(&t, NULL, fns[i], NULL);
	}
	pthread_sigmask(SIG_UNBLOCK, &rt, NULL); /* only main takes SIGRTMIN */
	printf("READY %d\n", getpid());
	fflush(stdout);
	while (fgets(line, sizeof line, stdin)) {
		if (!strncmp(line, "status", 6))
			status("STATUS");
		else if (!strncmp(line, "quit", 4))
			break;
	}
	if (ferror(stdin))
		err("stdin read", errno);
	status("FINAL");
	return atomic_load(&errors) ? 1 : 0;
}
