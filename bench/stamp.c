/* stamp FILE MS CODE: sleep MS milliseconds, append the wall-clock time (ns since the epoch) to FILE,
 * exit with CODE. The exit-to-event benchmark compares that stamp with the program.exited event. */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	if (argc != 4) {
		fprintf(stderr, "usage: stamp FILE MS CODE\n");
		return 2;
	}
	long ms = atol(argv[2]);
	struct timespec d = {ms / 1000, (ms % 1000) * 1000000L}, ts;
	nanosleep(&d, NULL);
	int fd = open(argv[1], O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
	if (fd < 0)
		return 1;
	char line[32];
	clock_gettime(CLOCK_REALTIME, &ts);
	int n = snprintf(line, sizeof(line), "%lld\n", (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec);
	if (write(fd, line, n) != n)
		return 1;
	_exit(atoi(argv[3]));
}
