/* Enters seccomp strict mode (read, write, _exit, sigreturn only), then
 * echoes every line it reads, prefixed: a dump of it must not run any of
 * the engine's injected syscalls through the filter (it would be killed). */
#include <linux/seccomp.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

int main(void)
{
	char buf[256] = "ECHO ";
	write(1, "READY\n", 6);
	if (prctl(PR_SET_SECCOMP, SECCOMP_MODE_STRICT))
		return 1;
	for (;;) {
		long n = read(0, buf + 5, sizeof buf - 5);
		if (n <= 0)
			syscall(SYS_exit, 0);
		write(1, buf, n + 5);
	}
}
