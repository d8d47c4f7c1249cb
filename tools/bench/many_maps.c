/* N separate one-page mappings side by side, protections alternating
 * (read-only / read-write) so that no two merge into one VMA; every
 * writable page gets a byte written (its page is in the image).
 *
 *   many_maps N hold     map, print READY, sleep (the process to dump)
 *   many_maps N native   map the same and exit (the limit: the same mmaps
 *                        made natively, timed by the caller from exec to exit)
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define BASE ((char *)0x200000000UL)

int main(int argc, char **argv)
{
	if (argc != 3) {
		fprintf(stderr, "usage: many_maps N hold|native\n");
		return 2;
	}
	long n = atol(argv[1]);
	long page = sysconf(_SC_PAGESIZE);
	for (long i = 0; i < n; i++) {
		int prot = i & 1 ? PROT_READ : PROT_READ | PROT_WRITE;
		char *p = mmap(BASE + i * page, page, prot,
			       MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
		if (p != BASE + i * page) {
			perror("mmap");
			return 1;
		}
		if (prot & PROT_WRITE)
			p[0] = (char)(i | 1);
	}
	if (strcmp(argv[2], "native") == 0)
		return 0;
	printf("READY\n");
	fflush(stdout);
	for (;;)
		pause();
}
