/* A pre-forked server-like process tree for tests/test_trees.py.
 *
 *   parent (reads commands on stdin, answers on stdout)
 *   |- worker 1..N   share a work pipe and a result pipe with the parent and
 *   |                a MAP_SHARED|MAP_ANONYMOUS counter page; all in one
 *   |                process group (led by worker 1), not the parent's
 *   |   `- (worker 1) grandchild with PR_SET_PDEATHSIG = SIGUSR1
 *   |- a child in its own session (setsid)
 *   `- a zombie: exited with status 7, not reaped
 * The parent is a child subreaper: the grandchild, orphaned, becomes its child.
 *
 * Commands:
 *   work K    K tokens into the work pipe; each worker adds the token to the
 *             shared counter and answers one byte; prints "DONE <sum> <counter>"
 *   check     prints "STATE OK" or "STATE BAD <reasons>" (groups, sessions,
 *             the zombie's status peeked with WNOWAIT, the workers alive)
 *   orphan    kills worker 1: its grandchild gets SIGUSR1 (parent death) and
 *             prints "PDEATH <sig>"
 *   quit      SIGTERM to the workers and the session child, reaps every
 *             child and prints "EXIT <pid>:<status> ... orphan:<status>" (the
 *             orphaned grandchild, reaped as the subreaper's) then exits
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#define MAXW 8
static int nworkers = 3;
static pid_t workers[MAXW], grandchild, session_kid, zombie;
static int work[2], result[2];
static _Atomic long *counter;

static void on_usr1(int sig) {
    char buf[32];
    int n = snprintf(buf, sizeof buf, "PDEATH %d\n", sig);
    write(1, buf, n);
    _exit(0);
}

static void grandchild_main(void) {
    signal(SIGUSR1, on_usr1);
    prctl(PR_SET_PDEATHSIG, SIGUSR1);
    for (;;) pause();
}

static void worker_main(int idx) {
    if (idx == 0) {
        grandchild = fork();
        if (grandchild == 0) grandchild_main();
    }
    close(work[1]);
    close(result[0]);
    for (;;) {
        long tok;
        ssize_t n = read(work[0], &tok, sizeof tok);
        if (n == 0) _exit(3);
        if (n != sizeof tok) {
            if (n < 0 && errno == EINTR) continue;
            _exit(4);
        }
        atomic_fetch_add(counter, tok);
        char c = 'x';
        if (write(result[1], &c, 1) != 1) _exit(5);
    }
}

static void check(void) {
    char bad[1024] = "";
    pid_t g = getpgid(workers[0]);
    if (g != workers[0]) snprintf(bad + strlen(bad), sizeof bad - strlen(bad), "worker group %d; ", g);
    for (int i = 0; i < nworkers; i++) {
        if (kill(workers[i], 0) != 0) snprintf(bad + strlen(bad), sizeof bad - strlen(bad), "worker %d gone; ", workers[i]);
        if (getpgid(workers[i]) != workers[0]) snprintf(bad + strlen(bad), sizeof bad - strlen(bad), "worker %d in group %d; ", workers[i], getpgid(workers[i]));
        if (getsid(workers[i]) != getsid(0)) snprintf(bad + strlen(bad), sizeof bad - strlen(bad), "worker %d in session %d; ", workers[i], getsid(workers[i]));
    }
    int sub = 0;
    if (prctl(PR_GET_CHILD_SUBREAPER, &sub) != 0 || sub != 1)
        snprintf(bad + strlen(bad), sizeof bad - strlen(bad), "not a subreaper; ");
    if (getpgid(0) == workers[0]) snprintf(bad + strlen(bad), sizeof bad - strlen(bad), "parent in the workers' group; ");
    if (getsid(session_kid) != session_kid) snprintf(bad + strlen(bad), sizeof bad - strlen(bad), "session child in session %d; ", getsid(session_kid));
    siginfo_t si;
    memset(&si, 0, sizeof si);
    if (waitid(P_PID, zombie, &si, WEXITED | WNOHANG | WNOWAIT) != 0 || si.si_pid != zombie ||
        si.si_code != CLD_EXITED || si.si_status != 7)
        snprintf(bad + strlen(bad), sizeof bad - strlen(bad), "zombie %d: pid %d code %d status %d; ", zombie, si.si_pid, si.si_code, si.si_status);
    printf("STATE %s%s\n", bad[0] ? "BAD " : "OK", bad);
    fflush(stdout);
}

int main(int argc, char **argv) {
    if (argc > 1) nworkers = atoi(argv[1]);
    if (nworkers < 1 || nworkers > MAXW) return 2;
    setvbuf(stdout, NULL, _IOLBF, 0);
    prctl(PR_SET_CHILD_SUBREAPER, 1);
    counter = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (counter == MAP_FAILED || pipe(work) || pipe(result)) return 2;
    zombie = fork();
    if (zombie == 0) _exit(7);
    for (int i = 0; i < nworkers; i++) {
        workers[i] = fork();
        if (workers[i] == 0) {
            setpgid(0, i == 0 ? 0 : workers[0]);
            worker_main(i);
        }
        setpgid(workers[i], workers[0]);
    }
    session_kid = fork();
    if (session_kid == 0) {
        setsid();
        for (;;) pause();
    }
    close(work[0]);
    close(result[1]);
    /* the zombie is really one before READY */
    siginfo_t si;
    do {
        memset(&si, 0, sizeof si);
        waitid(P_PID, zombie, &si, WEXITED | WNOWAIT);
    } while (si.si_pid != zombie);
    /* and the grandchild is running */
    usleep(100000);
    printf("READY");
    for (int i = 0; i < nworkers; i++) printf(" %d", workers[i]);
    printf(" session %d zombie %d\n", session_kid, zombie);
    long total = 0;
    char line[128];
    while (fgets(line, sizeof line, stdin)) {
        long k;
        if (sscanf(line, "work %ld", &k) == 1) {
            for (long t = 1; t <= k; t++) {
                total += t;
                if (write(work[1], &t, sizeof t) != sizeof t) return 6;
            }
            for (long t = 0; t < k; t++) {
                char c;
                if (read(result[0], &c, 1) != 1) return 7;
            }
            printf("DONE %ld %ld\n", total, atomic_load(counter));
        } else if (!strncmp(line, "check", 5)) {
            check();
        } else if (!strncmp(line, "orphan", 6)) {
            kill(workers[0], SIGKILL);
        } else if (!strncmp(line, "quit", 4)) {
            for (int i = 0; i < nworkers; i++) kill(workers[i], SIGTERM);
            kill(session_kid, SIGTERM);
            printf("EXIT");
            pid_t all[MAXW + 2];
            int n = 0;
            for (int i = 0; i < nworkers; i++) all[n++] = workers[i];
            all[n++] = session_kid;
            all[n++] = zombie;
            for (int i = 0; i < n; i++) {
                int st = 0;
                if (waitpid(all[i], &st, 0) != all[i]) st = -1;
                printf(" %d:%d", all[i], st);
            }
            int st = 0;
            pid_t o = waitpid(-1, &st, 0);   /* the orphan, a child of ours now */
            printf(" orphan:%d\n", o > 0 ? st : -1);
            return 0;
        }
    }
    return 0;
}
