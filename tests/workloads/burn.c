/*
 * ws1-burn: a workload with a known CPU profile, for the profiler tests.
 *
 * tests/build.rs compiles this file twice: ws1-burn-fp with frame pointers in every function
 * (leaf functions included) and ws1-burn-nofp without them, where only the .eh_frame unwind
 * tables describe the stack. The same source and the same work in both lets a test compare
 * what the frame-pointer and the DWARF unwinders see.
 *
 * Modes (arguments are all optional):
 *   --cpu            (default) loop forever: ws1_burn_three(), then ws1_burn_one(); the first
 *                    does exactly three times the iterations of the second, so a correct
 *                    profile gives them CPU time in a 3:1 ratio. Stack:
 *                    main -> ws1_run_cpu -> ws1_burn_three | ws1_burn_one
 *   --threads N      run the CPU loop in N threads (main runs one of them; the others are
 *                    ws1_cpu_thread -> ws1_run_cpu -> ...); CPU mode only
 *   --sleep-ms M     instead, loop { ws1_sleep_here(M) } with a little CPU work between sleeps,
 *                    so off-CPU time is M ms per call, attributed to
 *                    main -> ws1_run_sleep -> ws1_sleep_here (which makes the syscall itself)
 *   --seconds S      exit 0 after S seconds (default: run until killed)
 *   --report         CPU mode: count rounds (one ws1_burn_three plus one ws1_burn_one) per
 *                    thread, so a benchmark can see how much work the threads got done while
 *                    being profiled. Each SIGUSR1 prints "rounds <CLOCK_MONOTONIC ns> <n1> <n2>
 *                    ..." (rounds so far per thread) on stdout; at the --seconds deadline main
 *                    prints "rounds/s <r1> <r2> ... over <S> s" before it exits. A signal rather
 *                    than a periodic line, so the caller samples the counts exactly at the edges
 *                    of its measuring windows. The counting thread waits in sigwait and uses no
 *                    CPU in between.
 *
 * Once started, main prints "ready <pid>" on stdout and flushes it.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

/*
 * Iterations of ws1_burn_one; ws1_burn_three does 3x this. One iteration is a 64-bit multiply
 * and add on a loop-carried value (about 4 cycles), so a round of both is 4 * 600000 * 4 = 9.6 M
 * cycles: 3.1 ms measured on the development VM (2.3 ms in ws1_burn_three, 0.78 ms in
 * ws1_burn_one).
 */
#define UNIT_ITERATIONS 600000UL

/* Written at the end of each burn so the work has an observable result and is not removed. */
volatile uint64_t ws1_sink;

/* CLOCK_MONOTONIC nanoseconds at which to exit; 0 means never. */
static uint64_t deadline_ns;

/*
 * Rounds done by one CPU thread. A cache line each, so a thread's count does not bounce
 * between the CPUs its neighbours run on; written only by its thread, read by the reporter.
 */
struct ws1_counter {
    uint64_t rounds;
} __attribute__((aligned(64)));

/* One counter per CPU thread (main's is the first). */
static struct ws1_counter *counters;
static unsigned long counter_count;

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static int past_deadline(void)
{
    return deadline_ns != 0 && now_ns() >= deadline_ns;
}

/*
 * The work itself, expanded into each burn function so that every sample of it lands in that
 * function. A macro rather than an inline function: an inlined function leaves an inlined
 * frame in the debug info, and a symbolizer that reports inlined frames would then name the
 * helper, not ws1_burn_three or ws1_burn_one, as the leaf. The empty asm makes the value opaque
 * to the compiler on each iteration: no closed form, no vectorisation, no hoisting, so the time
 * is linear in the iteration count.
 */
#define LCG_STEPS(x, n)                                                                      \
    do {                                                                                     \
        for (unsigned long i_ = 0; i_ < (n); i_++) {                                         \
            (x) = (x) * 6364136223846793005ULL + 1442695040888963407ULL;                     \
            __asm__ volatile("" : "+r"(x));                                                  \
        }                                                                                    \
    } while (0)

/*
 * The starting value of a burn. Calling it makes the burn functions non-leaf: GCC 12 ignores
 * -mno-omit-leaf-frame-pointer for a leaf that needs no stack, and without a frame of its own a
 * sampled leaf hides its caller (ws1_run_cpu) from a frame-pointer walk. The call comes first,
 * so it cannot become a tail call that drops the frame again.
 */
__attribute__((noipa)) uint64_t ws1_seed(void)
{
    return ws1_sink;
}

/*
 * noipa: never inlined, cloned or folded with an identical function (it implies noinline,
 * noclone and no_icf), so both symbols exist and are the frames the samples land in.
 */
__attribute__((noipa)) void ws1_burn_three(void)
{
    uint64_t x = ws1_seed() ^ 3;
    LCG_STEPS(x, 3 * UNIT_ITERATIONS);
    ws1_sink = x;
}

__attribute__((noipa)) void ws1_burn_one(void)
{
    uint64_t x = ws1_seed() ^ 1;
    LCG_STEPS(x, UNIT_ITERATIONS);
    ws1_sink = x;
}

/* Counting costs one store per round of about 3 ms, so it is always on. */
__attribute__((noipa)) void ws1_run_cpu(struct ws1_counter *counter)
{
    do {
        ws1_burn_three();
        ws1_burn_one();
        __atomic_store_n(&counter->rounds, counter->rounds + 1, __ATOMIC_RELAXED);
    } while (!past_deadline());
}

__attribute__((noipa)) void *ws1_cpu_thread(void *arg)
{
    ws1_run_cpu(arg);
    return NULL;
}

/* --report: prints the counts at each SIGUSR1, which every thread has blocked. */
static void *report_thread(void *arg)
{
    sigset_t *usr1 = arg;
    for (;;) {
        int sig = 0;
        if (sigwait(usr1, &sig) != 0) {
            continue;
        }
        printf("rounds %llu", (unsigned long long)now_ns());
        for (unsigned long t = 0; t < counter_count; t++) {
            printf(" %llu",
                   (unsigned long long)__atomic_load_n(&counters[t].rounds, __ATOMIC_RELAXED));
        }
        printf("\n");
        fflush(stdout);
    }
    return NULL;
}

/*
 * Sleeps ms milliseconds in the nanosleep system call, resuming after signals so the time off
 * CPU is ms. On x86-64 the syscall instruction is in this function itself rather than in libc:
 * the user stack an off-CPU profiler takes at the context switch then starts here, and a
 * frame-pointer walk cannot lose this frame in libc's clock_nanosleep, which has no frame
 * pointer (perf shows libc's frame followed directly by ws1_run_sleep when it goes through libc).
 */
__attribute__((noipa)) void ws1_sleep_here(unsigned long ms)
{
    struct timespec left = {
        .tv_sec = (time_t)(ms / 1000),
        .tv_nsec = (long)(ms % 1000) * 1000000L,
    };
#if defined(__x86_64__)
    /* A leaf, but `left` lives on the stack, so GCC gives it a frame pointer in ws1-burn-fp. */
    long ret;
    do {
        __asm__ volatile("syscall"
                         : "=a"(ret)
                         : "0"((long)SYS_nanosleep), "D"(&left), "S"(&left)
                         : "rcx", "r11", "memory");
    } while (ret == -EINTR);
#else
    while (nanosleep(&left, &left) != 0 && errno == EINTR) {
    }
#endif
}

__attribute__((noipa)) void ws1_run_sleep(unsigned long ms)
{
    do {
        ws1_sleep_here(ms);
        /* A little CPU between sleeps (about 10 us), so the process is also seen on CPU. */
        uint64_t x = ws1_sink;
        LCG_STEPS(x, 10000);
        ws1_sink = x;
    } while (!past_deadline());
}

static void usage(const char *bad)
{
    fprintf(stderr,
            "ws1-burn: bad argument %s\n"
            "usage: ws1-burn [--cpu] [--threads N] [--sleep-ms M] [--seconds S] [--report]\n",
            bad);
    exit(2);
}

/* The value after flag argv[*i], as an unsigned number; advances *i past it. */
static unsigned long number_arg(int argc, char **argv, int *i)
{
    if (*i + 1 >= argc) {
        usage(argv[*i]);
    }
    *i += 1;
    char *end = NULL;
    errno = 0;
    unsigned long value = strtoul(argv[*i], &end, 10);
    if (errno != 0 || end == argv[*i] || *end != '\0' || argv[*i][0] == '-') {
        usage(argv[*i]);
    }
    return value;
}

int main(int argc, char **argv)
{
    unsigned long threads = 1, sleep_ms = 0, seconds = 0;
    int sleep_mode = 0, report = 0;

    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--cpu") == 0) {
            sleep_mode = 0;
        } else if (strcmp(argv[i], "--threads") == 0) {
            threads = number_arg(argc, argv, &i);
            if (threads == 0) {
                usage("--threads 0");
            }
        } else if (strcmp(argv[i], "--sleep-ms") == 0) {
            sleep_ms = number_arg(argc, argv, &i);
            sleep_mode = 1;
        } else if (strcmp(argv[i], "--seconds") == 0) {
            seconds = number_arg(argc, argv, &i);
        } else if (strcmp(argv[i], "--report") == 0) {
            report = 1;
        } else {
            usage(argv[i]);
        }
    }
    if (report && sleep_mode) {
        usage("--report (it counts CPU rounds; not with --sleep-ms)");
    }
    uint64_t started_ns = now_ns();
    if (seconds != 0) {
        deadline_ns = started_ns + (uint64_t)seconds * 1000000000ULL;
    }

    counter_count = sleep_mode ? 0 : threads;
    if (counter_count > 0) {
        counters = aligned_alloc(sizeof(struct ws1_counter), threads * sizeof(struct ws1_counter));
        if (counters == NULL) {
            fprintf(stderr, "ws1-burn: cannot allocate %lu counters\n", threads);
            return 1;
        }
        memset(counters, 0, threads * sizeof(struct ws1_counter));
    }

    static sigset_t usr1;
    if (report) {
        /* Blocked before any thread starts, so every thread inherits the mask and only
         * sigwait in the reporter takes the signal. */
        sigemptyset(&usr1);
        sigaddset(&usr1, SIGUSR1);
        pthread_sigmask(SIG_BLOCK, &usr1, NULL);
        pthread_t thread;
        int err = pthread_create(&thread, NULL, report_thread, &usr1);
        if (err != 0) {
            fprintf(stderr, "ws1-burn: cannot start the report thread: %s\n", strerror(err));
            return 1;
        }
        pthread_detach(thread);
    }

    if (!sleep_mode) {
        /* Main is one of the CPU threads, so the single-thread stack starts at main. */
        for (unsigned long t = 1; t < threads; t++) {
            pthread_t thread;
            int err = pthread_create(&thread, NULL, ws1_cpu_thread, &counters[t]);
            if (err != 0) {
                fprintf(stderr, "ws1-burn: cannot start thread: %s\n", strerror(err));
                return 1;
            }
            pthread_detach(thread);
        }
    }

    printf("ready %d\n", (int)getpid());
    fflush(stdout);

    if (sleep_mode) {
        ws1_run_sleep(sleep_ms);
    } else {
        ws1_run_cpu(&counters[0]);
    }
    if (report) {
        double elapsed = (double)(now_ns() - started_ns) / 1e9;
        printf("rounds/s");
        for (unsigned long t = 0; t < counter_count; t++) {
            uint64_t rounds = __atomic_load_n(&counters[t].rounds, __ATOMIC_RELAXED);
            printf(" %.1f", (double)rounds / elapsed);
        }
        printf(" over %.3f s\n", elapsed);
        fflush(stdout);
    }
    /* exit() ends the other CPU threads too; they check the same deadline anyway. */
    return 0;
}
