/* eventfd, signalfd and epoll that must survive dump -> kill -> restore.
 * Set up: an eventfd (semaphore, count 5), a signalfd reading SIGUSR1
 * (blocked), an epoll watching the eventfd (data 0x1234) and the signalfd
 * (data 0x5678, edge-triggered). On "check" it verifies, prints CHECK ok|bad. */
#define _GNU_SOURCE
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/signalfd.h>
#include <unistd.h>

int main(void)
{
	char line[64];
	sigset_t m;
	int efd = eventfd(5, EFD_SEMAPHORE | EFD_NONBLOCK);
	sigemptyset(&m);
	sigaddset(&m, SIGUSR1);
	sigprocmask(SIG_BLOCK, &m, NULL);
	int sfd = signalfd(-1, &m, SFD_NONBLOCK);
	int ep = epoll_create1(0);
	struct epoll_event ev = { .events = EPOLLIN, .data.u64 = 0x1234 };
	epoll_ctl(ep, EPOLL_CTL_ADD, efd, &ev);
	ev.events = EPOLLIN | EPOLLET;
	ev.data.u64 = 0x5678;
	epoll_ctl(ep, EPOLL_CTL_ADD, sfd, &ev);
	printf("READY %d\n", getpid());
	fflush(stdout);
	while (fgets(line, sizeof line, stdin)) {
		int bad = 0;
		uint64_t v = 0;
		struct epoll_event out[4];
		/* the eventfd is ready, with its data */
		int n = epoll_wait(ep, out, 4, 0);
		if (n != 1 || out[0].data.u64 != 0x1234)
			bad |= 1;
		/* semaphore: each read takes 1; 5 then 4 ... */
		if (read(efd, &v, 8) != 8 || v != 1)
			bad |= 2;
		/* the signalfd still reads SIGUSR1 */
		kill(getpid(), SIGUSR1);
		n = epoll_wait(ep, out, 4, 100);
		int saw = 0;
		for (int i = 0; i < n; i++)
			saw |= out[i].data.u64 == 0x5678;
		struct signalfd_siginfo si;
		if (!saw || read(sfd, &si, sizeof si) != sizeof si || si.ssi_signo != SIGUSR1)
			bad |= 4;
		printf("CHECK %s %d\n", bad ? "bad" : "ok", bad);
		fflush(stdout);
	}
	return 0;
}
