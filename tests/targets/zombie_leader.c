/* The main thread exits (pthread_exit) while another thread runs on: a
 * zombie thread-group leader (tests/test_proc_attrs.py). */
#include <pthread.h>
#include <stdio.h>
#include <unistd.h>
static void *run(void *a) { (void)a; for (;;) pause(); return 0; }
int main(void) { pthread_t t; pthread_create(&t, 0, run, 0); printf("READY %d\n", getpid()); fflush(stdout); pthread_exit(0); }
