/*
 * A root-started target that gives itself a reduced, unusual security state
 * and proves after dump -> kill -> restore that it still has exactly that:
 *
 *   securebits KEEP_CAPS | NOROOT | NOROOT_LOCKED
 *   bounding set without CAP_SYS_MODULE and CAP_NET_RAW
 *   uids 1000 (real, effective, saved), gids 1000, groups {4, 27}
 *   permitted {KILL, SETUID, NET_BIND_SERVICE}, effective {KILL,
 *   NET_BIND_SERVICE}, inheritable {NET_BIND_SERVICE}, ambient
 *   {NET_BIND_SERVICE}
 *   no_new_privs
 *   two seccomp filters, the second with SECCOMP_FILTER_FLAG_LOG: getppid
 *   returns EDOM from the first and ERANGE from the second (the newest
 *   filter wins among equal actions, so the order shows)
 *   parent-death signal SIGUSR2, dumpable 1
 *   a second thread, started after all that, holding the same state
 *
 * Prints "READY <tid of the second thread>", then answers "check" with
 * "CHECK ok" or "CHECK bad <what>...", "quit" exits 0.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <grp.h>
#include <linux/capability.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <pthread.h>
#include <signal.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/fsuid.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#ifndef SECBIT_KEEP_CAPS
#define SECBIT_NOROOT 0x1
#define SECBIT_NOROOT_LOCKED 0x2
#define SECBIT_KEEP_CAPS 0x10
#endif
#define WANT_SECUREBITS (SECBIT_KEEP_CAPS | SECBIT_NOROOT | SECBIT_NOROOT_LOCKED)
#define BIT(c) (1ULL << (c))
#define WANT_PRM (BIT(CAP_KILL) | BIT(CAP_SETUID) | BIT(CAP_NET_BIND_SERVICE))
#define WANT_EFF (BIT(CAP_KILL) | BIT(CAP_NET_BIND_SERVICE))
#define WANT_INH BIT(CAP_NET_BIND_SERVICE)

static char bad[4096];
static volatile pid_t thread_tid;

static void die(const char *what)
{
	printf("FAIL %s: %s\n", what, strerror(errno));
	fflush(stdout);
	exit(1);
}

static void note(const char *what, long long v)
{
	size_t n = strlen(bad);
	snprintf(bad + n, sizeof(bad) - n, " %s=%lld", what, v);
}

static void set_caps(unsigned long long eff, unsigned long long prm, unsigned long long inh)
{
	struct __user_cap_header_struct h = { _LINUX_CAPABILITY_VERSION_3, 0 };
	struct __user_cap_data_struct d[2] = {
		{ (unsigned)eff, (unsigned)prm, (unsigned)inh },
		{ (unsigned)(eff >> 32), (unsigned)(prm >> 32), (unsigned)(inh >> 32) },
	};
	if (syscall(SYS_capset, &h, d))
		die("capset");
}

static void get_caps(unsigned long long *eff, unsigned long long *prm, unsigned long long *inh)
{
	struct __user_cap_header_struct h = { _LINUX_CAPABILITY_VERSION_3, 0 };
	struct __user_cap_data_struct d[2];
	if (syscall(SYS_capget, &h, d))
		die("capget");
	*eff = d[0].effective | (unsigned long long)d[1].effective << 32;
	*prm = d[0].permitted | (unsigned long long)d[1].permitted << 32;
	*inh = d[0].inheritable | (unsigned long long)d[1].inheritable << 32;
}

static void filter(int err, unsigned flags)
{
	struct sock_filter f[] = {
		BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
		BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_getppid, 0, 1),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | err),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
	};
	struct sock_fprog p = { sizeof(f) / sizeof(f[0]), f };
	if (syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, flags, &p))
		die("seccomp");
}

/* everything this thread must still have; appends to bad[] */
static void check_thread(const char *who)
{
	unsigned long long eff, prm, inh;
	uid_t r, e, s;
	gid_t gr, ge, gs, groups[16];
	(void)who;
	get_caps(&eff, &prm, &inh);
	if (eff != WANT_EFF)
		note("eff", (long long)eff);
	if (prm != WANT_PRM)
		note("prm", (long long)prm);
	if (inh != WANT_INH)
		note("inh", (long long)inh);
	if (prctl(PR_CAPBSET_READ, CAP_SYS_MODULE) != 0 || prctl(PR_CAPBSET_READ, CAP_NET_RAW) != 0)
		note("bounding_dropped_back", 1);
	if (prctl(PR_CAPBSET_READ, CAP_CHOWN) != 1)
		note("bounding_chown", 0);
	if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_IS_SET, CAP_NET_BIND_SERVICE, 0, 0) != 1)
		note("ambient", 0);
	if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_IS_SET, CAP_KILL, 0, 0) != 0)
		note("ambient_kill", 1);
	if (prctl(PR_GET_SECUREBITS) != WANT_SECUREBITS)
		note("securebits", prctl(PR_GET_SECUREBITS));
	if (prctl(PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) != 1)
		note("no_new_privs", 0);
	if (prctl(PR_GET_SECCOMP) != 2)
		note("seccomp_mode", prctl(PR_GET_SECCOMP));
	errno = 0;
	if (syscall(SYS_getppid) != -1 || errno != ERANGE)
		note("getppid_errno", errno);
	getresuid(&r, &e, &s);
	getresgid(&gr, &ge, &gs);
	if (r != 1000 || e != 1000 || s != 1000 || setfsuid(-1) != 1000)
		note("uid", e);
	if (gr != 1000 || ge != 1000 || gs != 1000 || setfsgid(-1) != 1000)
		note("gid", ge);
	int n = getgroups(16, groups);
	if (n != 2 || groups[0] + groups[1] != 31)
		note("groups", n);
}

static void *second(void *a)
{
	(void)a;
	thread_tid = syscall(SYS_gettid);
	for (;;)
		pause();
	return NULL;
}

int main(void)
{
	gid_t groups[2] = { 4, 27 };
	char line[256];
	pthread_t t;

	setvbuf(stdout, NULL, _IOLBF, 0);
	if (prctl(PR_SET_SECUREBITS, WANT_SECUREBITS))
		die("securebits");
	if (prctl(PR_CAPBSET_DROP, CAP_SYS_MODULE) || prctl(PR_CAPBSET_DROP, CAP_NET_RAW))
		die("capbset_drop");
	if (setgroups(2, groups) || setresgid(1000, 1000, 1000) || setresuid(1000, 1000, 1000))
		die("setres*id");
	set_caps(WANT_EFF, WANT_PRM, WANT_INH);
	if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, CAP_NET_BIND_SERVICE, 0, 0))
		die("ambient");
	if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))
		die("nnp");
	filter(EDOM, 0);
	filter(ERANGE, SECCOMP_FILTER_FLAG_LOG);
	if (prctl(PR_SET_PDEATHSIG, SIGUSR2) || prctl(PR_SET_DUMPABLE, 1))
		die("pdeathsig/dumpable");
	pthread_create(&t, NULL, second, NULL);
	while (!thread_tid)
		usleep(1000);
	printf("READY %d\n", (int)thread_tid);
	while (fgets(line, sizeof(line), stdin)) {
		if (!strncmp(line, "check", 5)) {
			int sig = 0;
			bad[0] = 0;
			check_thread("main");
			if (prctl(PR_GET_PDEATHSIG, &sig) || sig != SIGUSR2)
				note("pdeath_signal", sig);
			if (prctl(PR_GET_DUMPABLE) != 1)
				note("dumpable", prctl(PR_GET_DUMPABLE));
			printf(bad[0] ? "CHECK bad%s\n" : "CHECK ok\n", bad);
		} else if (!strncmp(line, "quit", 4)) {
			return 0;
		}
	}
	return 0;
}
