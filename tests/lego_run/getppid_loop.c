/* Description: makes a known number of system calls for lego-run --syscalls: N getppid()
 * (argv[1], default 1000) and then 7 close() of descriptors that are not open (7 EBADF
 * errors), and prints the time per getppid() ("ns_per_getppid X") so that a run with
 * and without tracing measures what tracing costs per call. Exits with argv[2] (0). */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char** argv) {
  const long n = argc > 1 ? atol(argv[1]) : 1000;
  struct timespec a, b;
  clock_gettime(CLOCK_MONOTONIC, &a); /* vDSO: no system call */
  for (long i = 0; i < n; i++) getppid();
  clock_gettime(CLOCK_MONOTONIC, &b);
  for (int fd = 1000; fd < 1007; fd++) close(fd);
  const double ns = (double)(b.tv_sec - a.tv_sec) * 1e9 + (double)(b.tv_nsec - a.tv_nsec);
  printf("ns_per_getppid %.0f\n", n > 0 ? ns / (double)n : 0.0);
  return argc > 2 ? atoi(argv[2]) : 0;
}
