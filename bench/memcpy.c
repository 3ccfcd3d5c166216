/* glibc's memcpy of one TLS record's payload (16 KiB) at several distances between source and
 * destination modulo 4 KiB, in GB/s. Run by bench/memcpy, once with glibc's defaults and once
 * with the tunable the Dockerfile sets for legate (docs/performance.md). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double gbps(char *dst, const char *src, size_t n, int iters) {
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (int i = 0; i < iters; i++) {
        memcpy(dst, src, n);
        __asm__ volatile("" : : "r"(dst) : "memory");
    }
    clock_gettime(CLOCK_MONOTONIC, &b);
    double s = (double)(b.tv_sec - a.tv_sec) + (double)(b.tv_nsec - a.tv_nsec) / 1e9;
    return (double)n * iters / s / 1e9;
}

int main(void) {
    const size_t n = 16384;
    const int iters = 20000;
    const int distances[] = {-5, 0, 1, 5, 16, 31, 32, 64, 2048};
    char *src = aligned_alloc(4096, 1 << 16), *dst = aligned_alloc(4096, 1 << 16);
    if (!src || !dst) return 1;
    memset(src, 1, 1 << 16);
    memset(dst, 2, 1 << 16);
    printf("dst - src (mod 4096)  GB/s\n");
    for (size_t i = 0; i < sizeof distances / sizeof *distances; i++) {
        int d = distances[i];
        /* src at offset 64, dst at 64 + d: both in their own 4 KiB-aligned buffer */
        printf("%20d  %5.1f\n", d, gbps(dst + 64 + d, src + 64, n, iters));
    }
    return 0;
}
