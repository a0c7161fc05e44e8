/*
 * vsguest: the last steps of entering a vsstore guest, and the process that waits for (or
 * reaps under) what runs there.  vsstore/enter.py builds it (gcc -static -nostdlib) and
 * vsstore/lifecycle.py executes it by descriptor (a sealed memfd copy), so no file of it is
 * in any guest and nothing of the guest is loaded to run it.
 *
 * Freestanding on purpose: no C library, so between joining a guest and executing the
 * guest's command nothing runs that is not written here (no start-up code: a static glibc
 * reads /proc/self/exe before main; no locale, NSS, dlopen, environment tunables).  The
 * only paths it resolves while it holds privileges are "." and "/" of the entering steps;
 * the command's path is resolved after the capabilities are cut to the guest's.
 *
 * usage: vsguest MODE [OPTION...] [-- COMMAND [ARG...]]
 * MODE
 *   exec   fork; the child becomes COMMAND once this process holds no capability and no
 *          descriptor (it is not dumpable either); this process waits for it, passes HUP INT QUIT TERM USR1 USR2 WINCH on, reaps
 *          what it inherits (as a pid 1), and exits with its code (128+N for signal N)
 *   init   become COMMAND (pid 1 of a guest of style plain)
 *   sysv   fork; the child becomes COMMAND; this process reaps orphans until SIGTERM,
 *          SIGINT or SIGPWR, then exits 0 (pid 1 of a guest of style sysv)
 *   none   reap orphans until SIGTERM, SIGINT or SIGPWR (style none; no COMMAND)
 * OPTION (each once, except --setns and --rlimit)
 *   --errfd FD         why a step failed: "vsguest:STEP:ERRNO\n"; close-on-exec, so EOF
 *                      without a message means COMMAND runs (give it first)
 *   --setns FD         join the namespace FD, in the order given; FD is closed after
 *   --root FD          fchdir(FD), chroot("."), chdir("/"); FD is closed after
 *   --detach-old-root  umount2(".", MNT_DETACH), chdir("/"): what follows pivot_root(".", ".")
 *   --ctty FD          after setsid, FD becomes the command's controlling terminal
 *   --rlimit R:S:H     resource number R gets soft limit S and hard limit H (number or inf)
 *   --nice N           the command's nice value (-20..19)
 *   --caps HEX         the capabilities COMMAND keeps (bounding, permitted, effective,
 *                      inheritable; ambient cleared); default none
 *   --last-cap N       the kernel's highest capability number (read on the host); required
 *   --uid N --gid N    the command runs as user N, group N (suexec): set after the
 *                      bounding set is cut and before the other sets are (which a uid other
 *                      than 0 empties anyway); both or neither
 *   --groups A,B,...   with --uid: its supplementary groups (default none)
 *   --seccomp FD       a BPF program (struct sock_filter[], as libseccomp exports it) read
 *                      from FD at once (FD is closed); installed as the command's syscall
 *                      filter after descriptors are closed and before capabilities and
 *                      ids are cut: while CAP_SYS_ADMIN is still ours, so without
 *                      no_new_privs (setuid programs in the guest keep working)
 * Descriptors 0-2 are the command's; every other one is closed before it runs.  Its
 * environment is this program's; a COMMAND without '/' is searched in its PATH.
 */

typedef unsigned long u64;
typedef unsigned int u32;
typedef long i64;

#if defined(__x86_64__)
enum { NR_read = 0, NR_write = 1, NR_close = 3, NR_rt_sigaction = 13,
       NR_rt_sigprocmask = 14, NR_ioctl = 16, NR_clone = 56, NR_execve = 59, NR_wait4 = 61,
       NR_kill = 62, NR_fcntl = 72, NR_chdir = 80, NR_fchdir = 81, NR_setsid = 112,
       NR_capget = 125, NR_capset = 126, NR_setpriority = 141, NR_prctl = 157,
       NR_chroot = 161, NR_umount2 = 166, NR_exit_group = 231, NR_signalfd4 = 289,
       NR_pipe2 = 293, NR_prlimit64 = 302, NR_setns = 308, NR_close_range = 436,
       NR_setresuid = 117, NR_setresgid = 119, NR_setgroups = 116, NR_pread64 = 17,
       NR_seccomp = 317 };

static i64 sys6(i64 n, i64 a, i64 b, i64 c, i64 d, i64 e, i64 f)
{
    register i64 r10 __asm__("r10") = d;
    register i64 r8 __asm__("r8") = e;
    register i64 r9 __asm__("r9") = f;
    i64 ret;
    __asm__ volatile("syscall" : "=a"(ret)
                     : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8), "r"(r9)
                     : "rcx", "r11", "memory");
    return ret;
}

__asm__(".text\n.global _start\n_start:\n"
        "  xor %rbp, %rbp\n  mov %rsp, %rdi\n  and $-16, %rsp\n  call start_c\n  hlt\n");
#elif defined(__aarch64__)
enum { NR_read = 63, NR_write = 64, NR_close = 57, NR_rt_sigaction = 134,
       NR_rt_sigprocmask = 135, NR_ioctl = 29, NR_clone = 220, NR_execve = 221,
       NR_wait4 = 260, NR_kill = 129, NR_fcntl = 25, NR_chdir = 49, NR_fchdir = 50,
       NR_setsid = 157, NR_capget = 90, NR_capset = 91, NR_setpriority = 140,
       NR_prctl = 167, NR_chroot = 51, NR_umount2 = 39, NR_exit_group = 94,
       NR_signalfd4 = 74, NR_pipe2 = 59, NR_prlimit64 = 261, NR_setns = 268,
       NR_close_range = 436, NR_setresuid = 147, NR_setresgid = 149, NR_setgroups = 159,
       NR_pread64 = 67, NR_seccomp = 277 };

static i64 sys6(i64 n, i64 a, i64 b, i64 c, i64 d, i64 e, i64 f)
{
    register i64 x8 __asm__("x8") = n;
    register i64 x0 __asm__("x0") = a;
    register i64 x1 __asm__("x1") = b;
    register i64 x2 __asm__("x2") = c;
    register i64 x3 __asm__("x3") = d;
    register i64 x4 __asm__("x4") = e;
    register i64 x5 __asm__("x5") = f;
    __asm__ volatile("svc 0" : "+r"(x0)
                     : "r"(x8), "r"(x1), "r"(x2), "r"(x3), "r"(x4), "r"(x5)
                     : "memory", "cc");
    return x0;
}

__asm__(".text\n.global _start\n_start:\n"
        "  mov x29, #0\n  mov x30, #0\n  mov x0, sp\n  bl start_c\n  brk #0\n");
#else
#error "vsguest: only x86_64 and aarch64"
#endif

#define sys0(n) sys6(n, 0, 0, 0, 0, 0, 0)
#define sys1(n, a) sys6(n, (i64)(a), 0, 0, 0, 0, 0)
#define sys2(n, a, b) sys6(n, (i64)(a), (i64)(b), 0, 0, 0, 0)
#define sys3(n, a, b, c) sys6(n, (i64)(a), (i64)(b), (i64)(c), 0, 0, 0)
#define sys4(n, a, b, c, d) sys6(n, (i64)(a), (i64)(b), (i64)(c), (i64)(d), 0, 0)
#define sys5(n, a, b, c, d, e) sys6(n, (i64)(a), (i64)(b), (i64)(c), (i64)(d), (i64)(e), 0)

/* The compiler may emit calls to these for struct copies and zeroing. */
void *memset(void *d, int c, u64 n)
{
    volatile unsigned char *p = d;
    while (n--)
        *p++ = (unsigned char)c;
    return d;
}

void *memcpy(void *d, const void *s, u64 n)
{
    volatile unsigned char *p = d;
    const unsigned char *q = s;
    while (n--)
        *p++ = *q++;
    return d;
}

enum { EPERM = 1, ENOENT = 2, EINTR = 4, EACCES = 13, ENOTDIR = 20, EINVAL = 22,
       ENOSYS = 38, ELOOP = 40, ENAMETOOLONG = 36, ECHILD = 10 };
enum { SIGHUP = 1, SIGINT = 2, SIGQUIT = 3, SIGKILL = 9, SIGUSR1 = 10, SIGUSR2 = 12,
       SIGTERM = 15, SIGCHLD = 17, SIGSTOP = 19, SIGWINCH = 28, SIGPWR = 30, NSIG = 64 };
enum { PR_SET_PDEATHSIG = 1, PR_SET_DUMPABLE = 4, PR_SET_NAME = 15, PR_CAPBSET_DROP = 24,
       PR_CAP_AMBIENT = 47, PR_CAP_AMBIENT_CLEAR_ALL = 4 };
#define TIOCSCTTY 0x540E
#define MNT_DETACH 2
#define F_SETFD 2
#define FD_CLOEXEC 1
#define O_CLOEXEC 02000000
#define SIG_SETMASK 2
#define WNOHANG 1
#define CAP_V3 0x20080522
#define RLIM_INF (~0UL)
#define FD_MAX 0x7fffffffUL
#define MAX_NS 8
#define MAX_RLIMITS 16
#define MAX_GROUPS 64
#define ID_MAX 0xfffffffeUL
#define BPF_MAX 4096  /* BPF_MAXINSNS */
#define SECCOMP_SET_MODE_FILTER 1

static int errfd = -1;

static u64 len(const char *s)
{
    u64 n = 0;
    while (s[n])
        n++;
    return n;
}

static int same(const char *a, const char *b)
{
    while (*a && *a == *b)
        a++, b++;
    return *a == *b;
}

static __attribute__((noreturn)) void quit(int code)
{
    for (;;)
        sys1(NR_exit_group, code);
}

/* "vsguest:STEP:ERRNO\n" to the error pipe (if any), then exit 127. */
static void report(const char *step, i64 err)
{
    char buf[96];
    u64 n = 0;
    const char *p;
    char digits[24];
    int k = 0;
    u64 e = err < 0 ? (u64)-err : (u64)err;
    if (errfd < 0)
        return;
    for (p = "vsguest:"; *p && n < 40; p++)
        buf[n++] = *p;
    for (p = step; *p && n < 70; p++)
        buf[n++] = *p;
    buf[n++] = ':';
    do
        digits[k++] = (char)('0' + e % 10);
    while ((e /= 10) && k < 20);
    while (k)
        buf[n++] = digits[--k];
    buf[n++] = '\n';
    sys3(NR_write, errfd, buf, n);
}

static __attribute__((noreturn)) void fail(const char *step, i64 err)
{
    report(step, err);
    quit(127);
}

/* -- strict argument parsing ----------------------------------------------------------- */

static int parse_u64(const char *s, int base, u64 limit, u64 *out)
{
    u64 v = 0;
    if (!*s)
        return -1;
    for (; *s; s++) {
        u64 d;
        if (*s >= '0' && *s <= '9')
            d = (u64)(*s - '0');
        else if (base == 16 && *s >= 'a' && *s <= 'f')
            d = (u64)(*s - 'a' + 10);
        else
            return -1;
        if (v > (limit - d) / (u64)base)
            return -1;
        v = v * (u64)base + d;
    }
    *out = v;
    return 0;
}

static int parse_fd(const char *s, int *out)
{
    u64 v;
    if (parse_u64(s, 10, FD_MAX, &v))
        return -1;
    *out = (int)v;
    return 0;
}

static int parse_limit(const char *s, u64 *out)
{
    if (same(s, "inf")) {
        *out = RLIM_INF;
        return 0;
    }
    return parse_u64(s, 10, RLIM_INF - 1, out);
}

struct rlim { u32 resource; u64 soft, hard; };

struct opts {
    enum { EXEC, INIT, SYSV, NONE } mode;
    int ns[MAX_NS], nns;
    int root, ctty, detach, have_nice, have_caps, last_cap;
    i64 nice;
    u64 caps;
    struct rlim rl[MAX_RLIMITS];
    int nrl;
    int have_uid, have_gid, have_groups, ngroups;
    u32 uid, gid, groups[MAX_GROUPS];
    int seccomp;
    char **cmd;
};

struct sock_filter { unsigned short code; unsigned char jt, jf; u32 k; };
struct sock_fprog { unsigned short len; struct sock_filter *filter; };
static struct sock_filter filter[BPF_MAX];
static unsigned short filter_len;

/* "A,B,C": at most MAX_GROUPS group numbers */
static int parse_groups(const char *s, struct opts *o)
{
    char num[12];
    u64 v;
    int n = 0;
    for (;;) {
        const char *seg = s;
        while (*s && *s != ',')
            s++;
        if (s - seg < 1 || s - seg > 10 || o->ngroups == MAX_GROUPS)
            return -1;
        for (n = 0; seg + n < s; n++)
            num[n] = seg[n];
        num[n] = 0;
        if (parse_u64(num, 10, ID_MAX, &v))
            return -1;
        o->groups[o->ngroups++] = (u32)v;
        if (!*s)
            return 0;
        s++;
    }
}

/* "R:S:H" */
static int parse_rlimit(char *s, struct rlim *r)
{
    char *parts[3];
    int i = 0;
    u64 v;
    parts[i++] = s;
    for (; *s; s++)
        if (*s == ':') {
            if (i == 3)
                return -1;
            *s = 0;
            parts[i++] = s + 1;
        }
    if (i != 3 || parse_u64(parts[0], 10, MAX_RLIMITS - 1, &v))
        return -1;
    r->resource = (u32)v;
    if (parse_limit(parts[1], &r->soft) || parse_limit(parts[2], &r->hard))
        return -1;
    if (r->hard != RLIM_INF && (r->soft == RLIM_INF || r->soft > r->hard))
        return -1;
    return 0;
}

static void parse(int argc, char **argv, struct opts *o)
{
    int i, seen_errfd = 0, seen_root = 0, seen_ctty = 0;
    o->nns = o->nrl = 0;
    o->root = o->ctty = -1;
    o->detach = o->have_nice = o->have_caps = 0;
    o->last_cap = -1;
    o->caps = 0;
    o->have_uid = o->have_gid = o->have_groups = o->ngroups = 0;
    o->seccomp = -1;
    o->cmd = 0;
    if (argc < 2)
        fail("args", EINVAL);
    if (same(argv[1], "exec"))
        o->mode = EXEC;
    else if (same(argv[1], "init"))
        o->mode = INIT;
    else if (same(argv[1], "sysv"))
        o->mode = SYSV;
    else if (same(argv[1], "none"))
        o->mode = NONE;
    else
        fail("args", EINVAL);
    for (i = 2; i < argc; i++) {
        const char *a = argv[i];
        char *v = i + 1 < argc ? argv[i + 1] : 0;
        u64 n;
        if (same(a, "--")) {
            o->cmd = argv + i + 1;
            break;
        }
        if (same(a, "--detach-old-root")) {
            if (o->detach)
                fail("args", EINVAL);
            o->detach = 1;
            continue;
        }
        if (!v)
            fail("args", EINVAL);
        i++;
        if (same(a, "--errfd")) {
            int fd;
            if (seen_errfd++ || parse_fd(v, &fd) || fd < 3)
                fail("args", EINVAL);
            errfd = fd;
        } else if (same(a, "--setns")) {
            if (o->nns == MAX_NS || parse_fd(v, &o->ns[o->nns]) || o->ns[o->nns] < 3)
                fail("args", EINVAL);
            o->nns++;
        } else if (same(a, "--root")) {
            if (seen_root++ || parse_fd(v, &o->root) || o->root < 3)
                fail("args", EINVAL);
        } else if (same(a, "--ctty")) {
            if (seen_ctty++ || parse_fd(v, &o->ctty) || o->ctty > 2)
                fail("args", EINVAL);
        } else if (same(a, "--rlimit")) {
            if (o->nrl == MAX_RLIMITS || parse_rlimit(v, &o->rl[o->nrl]))
                fail("args", EINVAL);
            o->nrl++;
        } else if (same(a, "--nice")) {
            int neg = *v == '-';
            if (o->have_nice++ || parse_u64(v + neg, 10, 20, &n) || (!neg && n > 19))
                fail("args", EINVAL);
            o->nice = neg ? -(i64)n : (i64)n;
        } else if (same(a, "--caps")) {
            if (o->have_caps++ || len(v) > 16 || parse_u64(v, 16, ~0UL, &o->caps))
                fail("args", EINVAL);
        } else if (same(a, "--uid")) {
            if (o->have_uid++ || parse_u64(v, 10, ID_MAX, &n))
                fail("args", EINVAL);
            o->uid = (u32)n;
        } else if (same(a, "--gid")) {
            if (o->have_gid++ || parse_u64(v, 10, ID_MAX, &n))
                fail("args", EINVAL);
            o->gid = (u32)n;
        } else if (same(a, "--groups")) {
            if (o->have_groups++ || parse_groups(v, o))
                fail("args", EINVAL);
        } else if (same(a, "--seccomp")) {
            if (o->seccomp >= 0 || parse_fd(v, &o->seccomp) || o->seccomp < 3)
                fail("args", EINVAL);
        } else if (same(a, "--last-cap")) {
            if (o->last_cap >= 0 || parse_u64(v, 10, 63, &n))
                fail("args", EINVAL);
            o->last_cap = (int)n;
        } else {
            fail("args", EINVAL);
        }
    }
    if (o->last_cap < 0 || errfd < 0 || o->have_uid != o->have_gid ||
        (o->have_groups && !o->have_uid) || (o->have_uid && o->mode != EXEC))
        fail("args", EINVAL);
    if (o->mode == NONE ? o->cmd != 0 : (o->cmd == 0 || o->cmd[0] == 0 || !*o->cmd[0]))
        fail("args", EINVAL);
    if (o->mode != EXEC && (o->nns || o->root >= 0))
        fail("args", EINVAL);  /* a guest's pid 1 is started by lifecycle's own steps */
}

/* -- the syscall filter --------------------------------------------------------------- */

/* The whole program from ``fd`` (at most BPF_MAX instructions), then ``fd`` closed. */
static void read_filter(int fd)
{
    u64 got = 0, size = sizeof filter;
    i64 r;
    for (;;) {
        r = sys4(NR_pread64, fd, (char *)filter + got, size - got, got);
        if (r == -EINTR)
            continue;
        if (r < 0)
            fail("seccomp", r);
        if (r == 0)
            break;
        got += (u64)r;
        if (got == size) {  /* one byte more means too long */
            char b;
            if (sys4(NR_pread64, fd, &b, 1, got) != 0)
                fail("seccomp", EINVAL);
            break;
        }
    }
    if (got == 0 || got % sizeof filter[0])
        fail("seccomp", EINVAL);
    filter_len = (unsigned short)(got / sizeof filter[0]);
    sys1(NR_close, fd);
}

/* -- capabilities and signals ---------------------------------------------------------- */

struct cap_header { u32 version; int pid; };
struct cap_data { u32 effective, permitted, inheritable; };

/* Cut the bounding set to ``keep`` (while CAP_SETPCAP is still ours). */
static i64 cut_bounding(u64 keep, int last_cap)
{
    i64 r;
    int c;
    for (c = 0; c <= last_cap; c++)
        if (!(keep >> c & 1)) {
            r = sys5(NR_prctl, PR_CAPBSET_DROP, c, 0, 0, 0);
            if (r < 0)
                return r;
        }
    return 0;
}

/* Cut the ambient, effective, permitted and inheritable sets to ``keep``. */
static i64 cut_sets(u64 keep)
{
    struct cap_header h = { CAP_V3, 0 };
    struct cap_data d[2];
    i64 r;
    int i;
    r = sys5(NR_prctl, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0);
    if (r < 0 && r != -EINVAL)
        return r;
    r = sys2(NR_capget, &h, d);
    if (r < 0)
        return r;
    for (i = 0; i < 2; i++) {
        u32 m = (u32)(keep >> (32 * i));
        d[i].effective &= m;
        d[i].permitted &= m;
        d[i].inheritable &= m;
    }
    return sys2(NR_capset, &h, d);
}

/* Cut every capability set to ``keep``; 0 on success, else the failing errno. */
static i64 limit_caps(u64 keep, int last_cap)
{
    i64 r = cut_bounding(keep, last_cap);
    return r < 0 ? r : cut_sets(keep);
}

struct k_sigaction { u64 handler, flags, restorer, mask; };

/* Every disposition back to default (an exec keeps ignored signals ignored: Python ignores
 * SIGPIPE), nothing blocked but ``block``. */
static void reset_signals(u64 block)
{
    struct k_sigaction dfl = { 0, 0, 0, 0 };
    int s;
    for (s = 1; s <= NSIG; s++)
        if (s != SIGKILL && s != SIGSTOP)
            sys4(NR_rt_sigaction, s, &dfl, 0, 8);
    sys4(NR_rt_sigprocmask, SIG_SETMASK, &block, 0, 8);
}

#define BIT(s) (1UL << ((s) - 1))

static void close_from(int first)
{
    if (sys3(NR_close_range, first, ~0U, 0) < 0) {  /* kernels before 5.9 */
        int fd;
        for (fd = first; fd < 65536; fd++)
            sys1(NR_close, fd);
    }
}

/* -- the command ----------------------------------------------------------------------- */

static const char *env_path(char **envp)
{
    for (; *envp; envp++) {
        const char *e = *envp;
        if (e[0] == 'P' && e[1] == 'A' && e[2] == 'T' && e[3] == 'H' && e[4] == '=')
            return e + 5;
    }
    return "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
}

/* execve, with the PATH search of execvp (no shell fallback); returns the errno. */
static i64 run(char **cmd, char **envp)
{
    const char *name = cmd[0], *p;
    char buf[4096];
    u64 nlen = len(name);
    i64 r, err = -ENOENT;
    int i;
    for (i = 0; name[i]; i++)
        if (name[i] == '/')
            return sys3(NR_execve, name, cmd, envp);
    for (p = env_path(envp); ; p++) {
        const char *seg = p;
        u64 slen;
        while (*p && *p != ':')
            p++;
        slen = (u64)(p - seg);
        if (slen && slen + 1 + nlen < sizeof buf) {
            memcpy(buf, seg, slen);
            buf[slen] = '/';
            memcpy(buf + slen + 1, name, nlen + 1);
            r = sys3(NR_execve, buf, cmd, envp);
            if (r == -EACCES)
                err = r;
            else if (r != -ENOENT && r != -ENOTDIR && r != -ELOOP && r != -ENAMETOOLONG)
                return r;
        }
        if (!*p)
            break;
    }
    return err;
}

/* Session, terminal, limits, descriptors, capabilities: then the command, or why not. */
static __attribute__((noreturn)) void become(struct opts *o, char **envp)
{
    i64 r;
    int i;
    if ((r = sys0(NR_setsid)) < 0)
        fail("setsid", r);
    if (o->ctty >= 0 && (r = sys3(NR_ioctl, o->ctty, TIOCSCTTY, 0)) < 0)
        fail("ctty", r);
    for (i = 0; i < o->nrl; i++) {
        u64 lim[2] = { o->rl[i].soft, o->rl[i].hard };
        if ((r = sys4(NR_prlimit64, 0, o->rl[i].resource, lim, 0)) < 0)
            fail("rlimit", r);
    }
    if (o->have_nice && (r = sys3(NR_setpriority, 0, 0, o->nice)) < 0)
        fail("nice", r);
    if ((r = sys3(NR_fcntl, errfd, F_SETFD, FD_CLOEXEC)) < 0)
        fail("close", r);
    if (errfd > 3)
        sys3(NR_close_range, 3, errfd - 1, 0);
    close_from(errfd + 1);
    if (filter_len) {  /* CAP_SYS_ADMIN is ours still: no no_new_privs needed */
        struct sock_fprog prog = { filter_len, filter };
        if ((r = sys3(NR_seccomp, SECCOMP_SET_MODE_FILTER, 0, &prog)) < 0)
            fail("seccomp", r);
    }
    if (o->have_uid) {  /* suexec: the ids while CAP_SETUID/SETGID are still ours */
        if ((r = cut_bounding(o->have_caps ? o->caps : 0, o->last_cap)) < 0)
            fail("caps", r);
        if ((r = sys2(NR_setgroups, o->ngroups, o->groups)) < 0 ||
            (r = sys3(NR_setresgid, o->gid, o->gid, o->gid)) < 0 ||
            (r = sys3(NR_setresuid, o->uid, o->uid, o->uid)) < 0)
            fail("ids", r);
        if ((r = cut_sets(o->have_caps ? o->caps : 0)) < 0)
            fail("caps", r);
    } else if ((r = limit_caps(o->have_caps ? o->caps : 0, o->last_cap)) < 0)
        fail("caps", r);
    reset_signals(0);
    fail("exec", run(o->cmd, envp));
}

/* -- the waiting half ------------------------------------------------------------------ */

struct sfd_info { u32 signo; char rest[124]; };

static int code_of(int status)
{
    return (status & 0x7f) ? 128 + (status & 0x7f) : (status >> 8) & 0xff;
}

/* The waiting half: no capability and no descriptor but its signalfd, so whatever a guest
 * process could reach of it is worth nothing.  exec: wait for ``child``, passing signals
 * on, and exit with its code; sysv/none (``reaper``): reap until SIGTERM, SIGINT or SIGPWR
 * (exit 0: the kernel then ends the whole guest). */
static __attribute__((noreturn)) void wait_for(long child, u64 mask, int reaper, int last_cap)
{
    struct sfd_info si;
    int status, sfd = (int)sys4(NR_signalfd4, -1, &mask, 8, O_CLOEXEC);
    i64 r;
    if (sfd < 0 || (r = limit_caps(0, last_cap)) < 0) {
        if (child > 0)
            sys2(NR_kill, child, SIGKILL);
        fail("waiter", sfd < 0 ? sfd : r);
    }
    if (sfd > 0)
        sys3(NR_close_range, 0, sfd - 1, 0);
    close_from(sfd + 1);
    for (;;) {
        r = sys3(NR_read, sfd, &si, sizeof si);
        if (r == -EINTR)
            continue;
        if (r != (i64)sizeof si) {  /* cannot happen; never leave a command unwatched */
            if (child > 0)
                sys2(NR_kill, child, SIGKILL);
            quit(127);
        }
        if (si.signo == SIGCHLD) {
            while ((r = sys4(NR_wait4, -1, &status, WNOHANG, 0)) > 0)
                if (!reaper && r == child)
                    quit(code_of(status));
        } else if (reaper) {
            quit(0);
        } else {
            sys2(NR_kill, child, si.signo);
        }
    }
}

int main(int argc, char **argv, char **envp)
{
    static struct opts o;
    u64 mask;
    i64 r;
    long child = 0;
    int i;
    sys5(NR_prctl, PR_SET_DUMPABLE, 0, 0, 0, 0);  /* first: no ptrace, no /proc/PID/fd */
    sys5(NR_prctl, PR_SET_NAME, (u64)"vsguest", 0, 0, 0);
    parse(argc, argv, &o);
    if (o.seccomp >= 0)
        read_filter(o.seccomp);
    if (o.mode == EXEC)  /* our caller gone (killed): the command gets a hangup */
        sys5(NR_prctl, PR_SET_PDEATHSIG, SIGHUP, 0, 0, 0);
    mask = o.mode == EXEC ? BIT(SIGCHLD) | BIT(SIGHUP) | BIT(SIGINT) | BIT(SIGQUIT) |
               BIT(SIGTERM) | BIT(SIGUSR1) | BIT(SIGUSR2) | BIT(SIGWINCH)
         : o.mode == INIT ? 0 : BIT(SIGCHLD) | BIT(SIGTERM) | BIT(SIGINT) | BIT(SIGPWR);
    reset_signals(mask);  /* blocked before the fork: nothing is lost in between */
    for (i = 0; i < o.nns; i++) {
        if ((r = sys2(NR_setns, o.ns[i], 0)) < 0)
            fail("setns", r);
        sys1(NR_close, o.ns[i]);
    }
    if (o.root >= 0) {
        if ((r = sys1(NR_fchdir, o.root)) < 0 || (r = sys1(NR_chroot, ".")) < 0 ||
            (r = sys1(NR_chdir, "/")) < 0)
            fail("root", r);
        sys1(NR_close, o.root);
    }
    if (o.detach) {
        if ((r = sys2(NR_umount2, ".", MNT_DETACH)) < 0 || (r = sys1(NR_chdir, "/")) < 0)
            fail("detach", r);
    }
    if (o.mode == INIT)
        become(&o, envp);
    if (o.mode == SYSV && (r = sys0(NR_setsid)) < 0)
        fail("setsid", r);
    if (o.mode != NONE) {
        /* The command starts only once this half holds nothing: the gate opens (EOF) when
         * wait_for has dropped every capability and closed every descriptor. */
        int gate[2];
        char b;
        if ((r = sys2(NR_pipe2, gate, O_CLOEXEC)) < 0)
            fail("fork", r);
        child = sys5(NR_clone, SIGCHLD, 0, 0, 0, 0);
        if (child < 0)
            fail("fork", child);
        if (child == 0) {
            sys1(NR_close, gate[1]);
            while (sys3(NR_read, gate[0], &b, 1) == -EINTR)
                ;
            sys1(NR_close, gate[0]);
            become(&o, envp);
        }
        sys1(NR_close, gate[0]);
    }
    wait_for(child, mask, o.mode != EXEC, o.last_cap);
}

__attribute__((noreturn, used)) void start_c(long *sp)
{
    int argc = (int)sp[0];
    char **argv = (char **)(sp + 1);
    quit(main(argc, argv, argv + argc + 1));
}
