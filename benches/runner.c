/* One timed run of a command, as the benchmarks take it: prints "wall_s cpu_s maxrss_kib".
 *
 *   cc -O2 -o runner benches/runner.c      (benches/lib.sh: build_runner)
 *   ./runner LOG CMD [ARG...]
 *
 * The command's stdout and stderr go to LOG. Wall time is taken around the start and the
 * reaping of the command; CPU time is user + system of the whole process tree from
 * wait4's rusage (every process a tool starts is reaped by its parent, so its time is
 * added to its parent's and, in the end, to the command's); peak RSS is ru_maxrss (the
 * largest single process). Why C: a process's ru_maxrss starts at the peak of the memory
 * it exec'd from, so a runner in Python put its own ~10 MiB under every tool's figure,
 * and its fork added ~1 ms of its own work to every wall time. Exits with the command's
 * exit status (128 + signal if it was killed).
 */
#include <fcntl.h>
#include <stdio.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv) {
	if (argc < 3) {
		fprintf(stderr, "usage: runner LOG CMD [ARG...]\n");
		return 2;
	}
	struct timespec a, b;
	clock_gettime(CLOCK_MONOTONIC, &a);
	pid_t pid = fork();
	if (pid < 0) {
		perror("fork");
		return 2;
	}
	if (pid == 0) {
		int fd = open(argv[1], O_WRONLY | O_CREAT | O_TRUNC, 0644);
		if (fd < 0 || dup2(fd, 1) < 0 || dup2(fd, 2) < 0) {
			perror(argv[1]);
			_exit(127);
		}
		execvp(argv[2], argv + 2);
		perror(argv[2]);
		_exit(127);
	}
	int status;
	struct rusage ru;
	if (wait4(pid, &status, 0, &ru) < 0) {
		perror("wait4");
		return 2;
	}
	clock_gettime(CLOCK_MONOTONIC, &b);
	double wall = (b.tv_sec - a.tv_sec) + (b.tv_nsec - a.tv_nsec) / 1e9;
	double cpu = ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
	printf("%.4f %.4f %ld\n", wall, cpu, ru.ru_maxrss);
	if (WIFSIGNALED(status))
		return 128 + WTERMSIG(status);
	return WEXITSTATUS(status);
}
