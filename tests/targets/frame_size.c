/* Prints what the kernel itself writes in a signal frame's XSAVE software
 * bytes for this thread (magic1, extended_size, xfeatures, xstate_size), with
 * live YMM state, then waits on stdin so a test can read the same thread's
 * XSAVE regset with ptrace and compare (tests/test_inject_death.py). */
#define _GNU_SOURCE
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <ucontext.h>
#include <unistd.h>

static volatile uint32_t sw[6];

static void handler(int sig, siginfo_t *si, void *ctx)
{
	(void)sig; (void)si;
	ucontext_t *uc = ctx;
	const unsigned char *fp = (const unsigned char *)uc->uc_mcontext.fpregs;
	uint32_t magic1, ext, size;
	uint64_t feat;
	memcpy(&magic1, fp + 464, 4);
	memcpy(&ext, fp + 468, 4);
	memcpy(&feat, fp + 472, 8);
	memcpy(&size, fp + 480, 4);
	sw[0] = magic1; sw[1] = ext; sw[2] = (uint32_t)feat; sw[3] = (uint32_t)(feat >> 32);
	sw[4] = size;
}

int main(void)
{
	struct sigaction sa = { .sa_sigaction = handler, .sa_flags = SA_SIGINFO };
	static const double pattern[4] = { 1.5, -2.25, 3.125, 1e300 };
	char c;
	sigaction(SIGUSR1, &sa, NULL);
	__asm__ volatile("vmovupd (%0), %%ymm8" : : "r"(pattern) : "xmm8");
	raise(SIGUSR1);
	printf("FRAME magic1=%u extended=%u xfeatures=%llu size=%u\n", sw[0], sw[1],
	       (unsigned long long)sw[2] | (unsigned long long)sw[3] << 32, sw[4]);
	fflush(stdout);
	return read(0, &c, 1) < 0;
}
