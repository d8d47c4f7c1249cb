/*
 * /init of the test VM's initramfs (static; built by tools/qemu/setup.sh).
 *
 * 1. loads the modules listed in /modules/order (decompressed .ko, in
 *    dependency order) with finit_module;
 * 2. mounts the host's root (9p tag "hostroot") read-only at /newroot, with
 *    the guest's own proc, sys, dev and tmpfs on /tmp, /run, /var/tmp;
 * 3. mounts the run directory (9p tag "vmout", read-write) at the path given
 *    by the kernel parameter vmout=PATH (the same path as on the host);
 * 4. switches root and runs "/bin/sh $vmout/cmd.sh" with stdout and stderr
 *    in $vmout/output and stdin from /dev/null, reaping every zombie;
 * 5. writes the exit status to $vmout/exit-code and powers off.
 * Anything wrong before the command runs: a "vminit: ..." line on the
 * console and a power-off without an exit-code file.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

static void say(const char *fmt, ...)
{
	char buf[512];
	va_list ap;
	int n = snprintf(buf, sizeof buf, "vminit: ");
	va_start(ap, fmt);
	n += vsnprintf(buf + n, sizeof buf - n - 1, fmt, ap);
	va_end(ap);
	if (n > (int)sizeof buf - 2)
		n = sizeof buf - 2;
	buf[n++] = '\n';
	if (write(2, buf, n) < 0) { /* nothing to do */ }
}

static void die(const char *what)
{
	say("%s: %s", what, strerror(errno));
	sync();
	reboot(RB_POWER_OFF);
	_exit(1);
}

static void mkdir_p(const char *path)
{
	char tmp[4096];
	snprintf(tmp, sizeof tmp, "%s", path);
	for (char *p = tmp + 1; *p; p++) {
		if (*p == '/') {
			*p = 0;
			mkdir(tmp, 0755);
			*p = '/';
		}
	}
	mkdir(tmp, 0755);
}

static void mnt(const char *src, const char *dst, const char *type,
		unsigned long flags, const char *opts, int must)
{
	if (mount(src, dst, type, flags, opts) < 0) {
		if (must) {
			char what[600];
			snprintf(what, sizeof what, "mount %s on %s", type, dst);
			die(what);
		}
		say("mount %s on %s: %s (ignored)", type, dst, strerror(errno));
	}
}

static void load_modules(void)
{
	FILE *f = fopen("/modules/order", "r");
	char line[256];
	if (!f)
		return;
	while (fgets(line, sizeof line, f)) {
		line[strcspn(line, "\n")] = 0;
		if (!*line)
			continue;
		char path[300];
		snprintf(path, sizeof path, "/modules/%s", line);
		int fd = open(path, O_RDONLY | O_CLOEXEC);
		if (fd < 0)
			die(path);
		if (syscall(SYS_finit_module, fd, "", 0) < 0 && errno != EEXIST)
			die(path);
		close(fd);
	}
	fclose(f);
}

int main(void)
{
	const char *out = getenv("vmout");
	char path[4096];

	if (!out || out[0] != '/') {
		errno = EINVAL;
		die("no vmout=/path on the kernel command line");
	}
	load_modules();

	mkdir("/newroot", 0755);
	mnt("hostroot", "/newroot", "9p", MS_RDONLY,
	    "trans=virtio,version=9p2000.L,msize=512000,cache=loose", 1);
	mnt("proc", "/newroot/proc", "proc", 0, NULL, 1);
	mnt("sysfs", "/newroot/sys", "sysfs", 0, NULL, 0);
	mnt("devtmpfs", "/newroot/dev", "devtmpfs", 0, NULL, 1);
	mkdir("/newroot/dev/shm", 01777);
	mkdir("/newroot/dev/pts", 0755);
	mnt("tmpfs", "/newroot/dev/shm", "tmpfs", 0, "mode=1777", 0);
	mnt("devpts", "/newroot/dev/pts", "devpts", 0, "ptmxmode=0666", 0);
	mnt("tmpfs", "/newroot/tmp", "tmpfs", 0, "mode=1777", 1);
	mnt("tmpfs", "/newroot/run", "tmpfs", 0, "mode=755", 0);
	mnt("tmpfs", "/newroot/var/tmp", "tmpfs", 0, "mode=1777", 0);

	/* the repository at its host path, read-only (it may live under /tmp) */
	const char *repo = getenv("vmrepo");
	if (repo && repo[0] == '/') {
		snprintf(path, sizeof path, "/newroot%s", repo);
		mkdir_p(path);
		mnt("vmrepo", path, "9p", MS_RDONLY,
		    "trans=virtio,version=9p2000.L,msize=512000,cache=loose", 1);
	}

	snprintf(path, sizeof path, "/newroot%s", out);
	mkdir_p(path);  /* only where the path is on a tmpfs; else it exists */
	mnt("vmout", path, "9p", 0, "trans=virtio,version=9p2000.L,msize=512000", 1);

	if (chdir("/newroot") < 0)
		die("chdir /newroot");
	if (mount(".", "/", NULL, MS_MOVE, NULL) < 0)
		die("move /newroot to /");
	if (chroot(".") < 0 || chdir("/") < 0)
		die("chroot");

	pid_t child = fork();
	if (child < 0)
		die("fork");
	if (child == 0) {
		char script[4096], log[4096];
		snprintf(script, sizeof script, "%s/cmd.sh", out);
		snprintf(log, sizeof log, "%s/output", out);
		int in = open("/dev/null", O_RDONLY);
		int o = open(log, O_WRONLY | O_CREAT | O_TRUNC | O_APPEND, 0644);
		if (in < 0 || o < 0)
			die(log);
		dup2(in, 0);
		dup2(o, 1);
		dup2(o, 2);
		if (in > 2)
			close(in);
		if (o > 2)
			close(o);
		setsid();
		char *argv[] = {"/bin/sh", script, NULL};
		char *envp[] = {"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
				"HOME=/tmp", "TERM=dumb", "LANG=C.UTF-8", NULL};
		execve("/bin/sh", argv, envp);
		die("exec /bin/sh");
	}

	int status = 0, code = 125;
	for (;;) {
		pid_t p = waitpid(-1, &status, 0);
		if (p < 0 && errno == EINTR)
			continue;
		if (p < 0)
			break;
		if (p == child) {
			code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
			break;
		}
	}
	snprintf(path, sizeof path, "%s/exit-code", out);
	FILE *f = fopen(path, "w");
	if (f) {
		fprintf(f, "%d\n", code);
		fclose(f);
	}
	say("exit %d", code);
	sync();
	reboot(RB_POWER_OFF);
	return 0;
}
