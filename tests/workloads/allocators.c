/*
 * A workload for tests/tests/allocators.rs, built by the test against one allocator:
 * -DUSE_JEMALLOC (Debian's libjemalloc), -DUSE_RJEM (a static jemalloc whose API carries the
 * `_rjem_` prefix, as Rust's tikv-jemallocator exports it), -DUSE_TCMALLOC (gperftools),
 * -DUSE_MIMALLOC, or -DUSE_LIBC (the C library's malloc; the tests link it statically).
 *
 * Line protocol on stdin/stdout, as the other workloads: prints "ready PID"; `go` leaks K blocks
 * of S bytes in leak_plain (through malloc, which the allocator interposes, or its prefixed
 * malloc) and K more in leak_special (through the allocator's own API), then allocates and frees
 * N rounds of blocks through the allocator-specific entry points (balanced churn), and answers
 * "ok"; `exit` exits. Usage: allocators K S N
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#if defined(USE_JEMALLOC)
#include <jemalloc/jemalloc.h>
#elif defined(USE_RJEM)
void *_rjem_malloc(size_t size);
void _rjem_free(void *ptr);
void *_rjem_mallocx(size_t size, int flags);
void *_rjem_rallocx(void *ptr, size_t size, int flags);
size_t _rjem_xallocx(void *ptr, size_t size, size_t extra, int flags);
void _rjem_sdallocx(void *ptr, size_t size, int flags);
void _rjem_dallocx(void *ptr, int flags);
#define malloc _rjem_malloc
#define free _rjem_free
#define mallocx _rjem_mallocx
#define rallocx _rjem_rallocx
#define xallocx _rjem_xallocx
#define sdallocx _rjem_sdallocx
#define dallocx _rjem_dallocx
#elif defined(USE_TCMALLOC)
#include <gperftools/tcmalloc.h>
/* The C++ entry points (operator new/delete underneath), declared only for C++. */
void *tc_new(size_t size);
void tc_delete_sized(void *p, size_t size);
void *tc_newarray(size_t size);
void tc_deletearray_sized(void *p, size_t size);
#elif defined(USE_MIMALLOC)
#include <mimalloc.h>
#elif defined(USE_LIBC)
#else
#error "choose an allocator"
#endif

#define MAX_BLOCKS 4096
static void *volatile kept[2 * MAX_BLOCKS];
static volatile size_t kept_n;

static void keep(void *p, size_t size) {
    memset(p, 1, size);
    if (kept_n < 2 * MAX_BLOCKS) {
        kept[kept_n++] = p;
    }
}

__attribute__((noinline)) void leak_plain(size_t k, size_t s) {
    for (size_t i = 0; i < k; i++) {
        keep(malloc(s), s);
    }
}

__attribute__((noinline)) void leak_special(size_t k, size_t s) {
    for (size_t i = 0; i < k; i++) {
#if defined(USE_JEMALLOC) || defined(USE_RJEM)
        void *p = mallocx(s, 0);
#elif defined(USE_TCMALLOC)
        void *p = tc_new(s);
#elif defined(USE_MIMALLOC)
        void *p = mi_malloc(s);
#else
        void *p = calloc(1, s);
#endif
        keep(p, s);
    }
}

/* Each round allocates and frees through the entry points only this allocator has. */
__attribute__((noinline)) void balanced_churn(size_t n, size_t s) {
    for (size_t i = 0; i < n; i++) {
#if defined(USE_JEMALLOC) || defined(USE_RJEM)
        void *a = mallocx(s, 0);
        memset(a, 2, s);
        sdallocx(a, s, 0);
        void *b = mallocx(s, 0);
        b = rallocx(b, 2 * s, 0);
        xallocx(b, 4 * s, 0, 0);
        dallocx(b, 0);
        void *c = malloc(s);
        sdallocx(c, s, 0);
#elif defined(USE_TCMALLOC)
        void *a = tc_malloc(s);
        memset(a, 2, s);
        tc_free_sized(a, s);
        void *b = tc_new(s);
        tc_delete_sized(b, s);
        void *c = tc_newarray(s);
        tc_deletearray_sized(c, s);
        void *d = malloc(s);
        tc_free(d);
#elif defined(USE_MIMALLOC)
        void *a = mi_malloc(s);
        memset(a, 2, s);
        mi_free(a);
        void *b = mi_zalloc(s);
        mi_free_size(b, s);
        void *c = mi_malloc_aligned(s, 64);
        c = mi_realloc_aligned(c, 2 * s, 64);
        mi_free_aligned(c, 64);
        void *d = malloc(s);
        mi_free(d);
#else
        void *a = malloc(s);
        memset(a, 2, s);
        a = realloc(a, 2 * s);
        free(a);
#endif
    }
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s K S N\n", argv[0]);
        return 2;
    }
    size_t k = strtoul(argv[1], NULL, 10);
    size_t s = strtoul(argv[2], NULL, 10);
    size_t n = strtoul(argv[3], NULL, 10);
    if (k > MAX_BLOCKS || s == 0) {
        fprintf(stderr, "K at most %d, S above 0\n", MAX_BLOCKS);
        return 2;
    }
    char line[64];
    setvbuf(stdout, NULL, _IONBF, 0);
    printf("ready %d\n", (int)getpid());
    while (fgets(line, sizeof line, stdin)) {
        if (strcmp(line, "go\n") == 0) {
            leak_plain(k, s);
            leak_special(k, s);
            balanced_churn(n, s);
            printf("ok\n");
        } else if (strcmp(line, "exit\n") == 0) {
            return 0;
        } else {
            printf("error: unknown command\n");
        }
    }
    return 0;
}
