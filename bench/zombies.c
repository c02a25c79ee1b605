/* Zombies for the reaping benchmark, and orphans for the event benchmark.
 *
 *   zombies reap N     N processes become orphans of our parent's reaper (the container's PID 1, or the
 *                      nearest child subreaper) and all exit at once; prints the microseconds from their
 *                      release until the reaper has reaped every one of them, then exits 0.
 *   zombies orphans N  forks N children that exit at once, never waits for them, and exits: N zombies
 *                      land on the nearest subreaper together.
 *
 * How "reaped" is seen: /proc/PPID/task/PPID/children lists the reaper's children, zombies included;
 * once it lists only us, every orphan is gone. The reaper is our parent: the orphans are reparented to
 * it because nothing between them and it is a subreaper.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static char buf[1 << 20];

/* how many children the reaper has, zombies included */
static int reaper_children(const char *path)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0) {
		perror(path);
		exit(1);
	}
	ssize_t n, len = 0;
	while ((n = read(fd, buf + len, sizeof(buf) - 1 - len)) > 0)
		len += n;
	close(fd);
	int count = 0;
	for (ssize_t i = 0; i < len; i++)
		if (buf[i] == ' ')
			count++;
	return count;
}

static int reap(int n)
{
	int release[2];
	char path[64];
	pid_t reaper = getppid();
	snprintf(path, sizeof(path), "/proc/%d/task/%d/children", reaper, reaper);
	if (pipe2(release, O_CLOEXEC) < 0) {
		perror("pipe2");
		return 1;
	}
	pid_t spawner = fork();
	if (spawner == 0) {
		for (int i = 0; i < n; i++) {
			pid_t c = fork();
			if (c == 0) {
				char b;
				close(release[1]);
				while (read(release[0], &b, 1) < 0 && errno == EINTR)
					;
				_exit(0);
			}
			if (c < 0) {
				perror("fork");
				_exit(1);
			}
		}
		_exit(0);
	}
	close(release[0]);
	int st;
	waitpid(spawner, &st, 0);
	if (!WIFEXITED(st) || WEXITSTATUS(st) != 0)
		return 1;
	int before = reaper_children(path);
	if (before < n + 1) {
		fprintf(stderr, "zombies: only %d children under pid %d, expected %d\n", before, reaper, n + 1);
		return 1;
	}
	struct timespec pause = {0, 100000};
	double t0 = now();
	close(release[1]);
	while (reaper_children(path) > 1) {
		if (now() - t0 > 60) {
			fprintf(stderr, "zombies: not all reaped after 60 s\n");
			return 1;
		}
		nanosleep(&pause, NULL);
	}
	printf("%.0f\n", (now() - t0) * 1e6);
	return 0;
}

static int orphans(int n)
{
	for (int i = 0; i < n; i++) {
		pid_t c = fork();
		if (c == 0)
			_exit(0);
		if (c < 0) {
			perror("fork");
			return 1;
		}
	}
	return 0;
}

int main(int argc, char **argv)
{
	if (argc == 3 && strcmp(argv[1], "reap") == 0)
		return reap(atoi(argv[2]));
	if (argc == 3 && strcmp(argv[1], "orphans") == 0)
		return orphans(atoi(argv[2]));
	fprintf(stderr, "usage: zombies reap N | zombies orphans N\n");
	return 2;
}
