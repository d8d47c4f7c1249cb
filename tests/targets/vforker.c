/* The main thread sits in vfork() (uninterruptible, 'D') while the child
 * sleeps ARGV[1] seconds before exiting; then it prints DONE. */
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	double secs = argc > 1 ? atof(argv[1]) : 1.0;
	printf("READY %d\n", getpid());
	fflush(stdout);
	pid_t c = vfork();
	if (c == 0) {
		struct timespec ts = { (time_t)secs, (long)((secs - (long)secs) * 1e9) };
		nanosleep(&ts, NULL);
		_exit(0);
	}
	waitpid(c, NULL, 0);
	printf("DONE\n");
	fflush(stdout);
	return 0;
}
