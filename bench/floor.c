/* The floor for a container start: only what every runtime must do, nothing else.
 *
 *   floor ROOTFS CMD [ARG...]
 *
 * unshare(NEWNS|NEWUTS|NEWIPC|NEWPID|NEWNET); fork (the child is PID 1 of the new pid namespace);
 * in the child: make / private, bind ROOTFS onto itself, pivot_root into it, mount /proc, exec CMD.
 * The parent waits and exits with the child's status. No cgroups, no devices, no capabilities.
 */
#define _GNU_SOURCE
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mount.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

static void die(const char *what, const char *arg)
{
	fprintf(stderr, "floor: %s(%s): ", what, arg);
	perror("");
	_exit(125);
}

int main(int argc, char **argv)
{
	if (argc < 3) {
		fprintf(stderr, "usage: floor ROOTFS CMD [ARG...]\n");
		return 2;
	}
	const char *root = argv[1];
	if (unshare(CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWPID | CLONE_NEWNET) < 0)
		die("unshare", "NEWNS|NEWUTS|NEWIPC|NEWPID|NEWNET");
	pid_t pid = fork();
	if (pid < 0)
		die("fork", "");
	if (pid == 0) {
		if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) < 0)
			die("mount", "/ private");
		if (mount(root, root, NULL, MS_BIND | MS_REC, NULL) < 0)
			die("mount", root);
		if (chdir(root) < 0)
			die("chdir", root);
		if (syscall(SYS_pivot_root, ".", ".") < 0)
			die("pivot_root", root);
		if (umount2(".", MNT_DETACH) < 0)
			die("umount2", ".");
		if (chdir("/") < 0)
			die("chdir", "/");
		if (mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL) < 0)
			die("mount", "/proc");
		execv(argv[2], argv + 2);
		die("execv", argv[2]);
	}
	int status;
	if (waitpid(pid, &status, 0) < 0)
		die("waitpid", "");
	return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}
