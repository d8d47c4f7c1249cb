/* A parent and N forked workers sharing MIB MiB of private memory
 * copy-on-write, for tests/test_trees.py and tools/bench/bench_tree.py.
 *
 *   cow_tree MIB N
 *
 * The parent fills the region (word 0 of page i = i ^ SALT1), forks N
 * workers, then rewrites pages [0, 64) (SALT2: the workers keep the old
 * ones). Worker w writes its marker into pages [100 + 10w, 110 + 10w).
 * Commands on stdin:
 *   parentwrite   the parent rewrites pages [64, 128) (SALT3), after the fork:
 *                 the workers' copies stay SALT1
 *   check         every process checks every page; prints "CHECK good N" or
 *                 "CHECK bad ..."
 *   quit          SIGTERM to the workers, reaped, exit 0
 */
#define _GNU_SOURCE
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#define SALT1 0x5a5a000000000000ull
#define SALT2 0x3c3c000000000000ull
#define SALT3 0x7e7e000000000000ull
#define MARK  0x1111000000000000ull
#define PG 4096

static uint64_t *mem;
static size_t pages;
static int nworkers, me = -1, parent_wrote;
static int report[2];
static pid_t workers[64];

static uint64_t want(size_t i) {
    if (me < 0) {
        if (i < 64) return i ^ SALT2;
        if (i < 128 && parent_wrote) return i ^ SALT3;
        return i ^ SALT1;
    }
    if (i >= 100 + 10u * me && i < 110 + 10u * me) return i ^ MARK ^ (uint64_t)me;
    return i ^ SALT1;
}

static int check(void) {
    for (size_t i = 0; i < pages; i++)
        if (mem[i * (PG / 8)] != want(i)) return (int)i + 1;
    return 0;
}

static void on_usr1(int sig) {
    (void)sig;
    char c = check() ? 'B' : 'G';
    write(report[1], &c, 1);
}

int main(int argc, char **argv) {
    size_t mib = argc > 1 ? strtoul(argv[1], 0, 10) : 64;
    nworkers = argc > 2 ? atoi(argv[2]) : 4;
    if (nworkers < 0 || nworkers > 64) return 2;
    pages = mib * 256;
    if (pages < 128 + 10 * nworkers) return 2;
    mem = mmap(NULL, pages * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED || pipe(report)) return 2;
    for (size_t i = 0; i < pages; i++) {
        memset(mem + i * (PG / 8), 0x42, PG);
        mem[i * (PG / 8)] = i ^ SALT1;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    for (int w = 0; w < nworkers; w++) {
        workers[w] = fork();
        if (workers[w] == 0) {
            me = w;
            for (size_t i = 100 + 10u * w; i < 110 + 10u * w; i++)
                mem[i * (PG / 8)] = i ^ MARK ^ (uint64_t)w;
            signal(SIGUSR1, on_usr1);
            for (;;) pause();
        }
    }
    for (size_t i = 0; i < 64; i++) mem[i * (PG / 8)] = i ^ SALT2;
    usleep(100000);
    printf("READY");
    for (int w = 0; w < nworkers; w++) printf(" %d", workers[w]);
    printf("\n");
    char line[64];
    while (fgets(line, sizeof line, stdin)) {
        if (!strncmp(line, "parentwrite", 11)) {
            for (size_t i = 64; i < 128; i++) mem[i * (PG / 8)] = i ^ SALT3;
            parent_wrote = 1;
            printf("WROTE\n");
        } else if (!strncmp(line, "check", 5)) {
            int bad = check(), good = 0;
            for (int w = 0; w < nworkers; w++) kill(workers[w], SIGUSR1);
            for (int w = 0; w < nworkers; w++) {
                char c;
                if (read(report[0], &c, 1) == 1 && c == 'G') good++;
            }
            if (bad || good != nworkers)
                printf("CHECK bad parent page %d, %d of %d workers good\n", bad - 1, good, nworkers);
            else
                printf("CHECK good %d\n", nworkers);
        } else if (!strncmp(line, "quit", 4)) {
            for (int w = 0; w < nworkers; w++) kill(workers[w], SIGTERM);
            for (int w = 0; w < nworkers; w++) waitpid(workers[w], NULL, 0);
            return 0;
        }
    }
    return 0;
}
