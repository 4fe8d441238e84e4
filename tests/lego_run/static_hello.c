/* A statically linked program: LD_PRELOAD cannot reach it, so under lego-run its memory
 * would all be local. lego_run_test checks that lego-run refuses it (or, with
 * --allow-local, warns and runs it). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int main(void) {
  char *p = malloc(1 << 20);
  if (p == NULL) return 1;
  memset(p, 7, 1 << 20);
  printf("static hello %d\n", p[12345]);
  free(p);
  return 0;
}
