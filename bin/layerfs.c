/*
 * The `layerfs` command: `layerfs mount` handed to the store's warm mount
 * server with no Python started; everything else is the Python command,
 * `layerfs-py` beside this program, exec'd with the same arguments.
 *
 * Why: a mount the server answers costs it ~10 ms, and a Python client
 * costs more than that just to start (35-55 ms from dropped caches on a
 * 2-CPU VM: the interpreter's own files, then ours). This is the client
 * of cli/fastpath.py in C, as chg is Mercurial's command server's. It
 * takes exactly what fastpath.parse takes, less what it is unsure of (a
 * relative or unnormalized path, a name that is not ASCII, a socket path
 * too long for sun_path), and gives anything else to layerfs-py: another
 * command, --help, no server running (layerfs-py starts one), a request
 * the server leaves to the CLI. Requests are the Python client's
 * (fs/mountclient.py: a 4-byte length, then a marshal-encoded dict), with
 * "reply": "plain", so the answer is the exit code and what to print
 * (mountclient.plain_reply), not a marshal dict.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

extern char **environ;

static char **args;

/* Run the Python command with our arguments; never returns. */
static void python_cli(void)
{
    char self[PATH_MAX], script[PATH_MAX + 16];
    ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);

    if (n > 0) {
        self[n] = '\0';
        char *slash = strrchr(self, '/');
        if (slash != NULL) {
            *slash = '\0';
            snprintf(script, sizeof script, "%s/layerfs-py", self);
            execv(script, args);
            fprintf(stderr, "Error: cannot run %s: %s\n", script, strerror(errno));
            exit(1);
        }
    }
    fprintf(stderr, "Error: cannot find layerfs-py beside this program\n");
    exit(1);
}

/* -- the request, marshal-encoded (what Python's marshal.loads reads) ------- */
struct buf {
    char data[65536];
    size_t len;
};

static void put(struct buf *b, const void *p, size_t n)
{
    if (b->len + n > sizeof b->data)
        python_cli(); /* (environment variables this big: the Python client copes) */
    memcpy(b->data + b->len, p, n);
    b->len += n;
}

static void put_i32(struct buf *b, int32_t v)
{
    unsigned char le[4] = {v & 0xff, (v >> 8) & 0xff, (v >> 16) & 0xff, ((uint32_t)v >> 24) & 0xff};
    put(b, le, 4);
}

static void put_str(struct buf *b, const char *s)
{
    put(b, "u", 1);
    put_i32(b, (int32_t)strlen(s));
    put(b, s, strlen(s));
}

static void put_uint(struct buf *b, uint64_t v)
{
    if (v <= INT32_MAX) {
        put(b, "i", 1);
        put_i32(b, (int32_t)v);
        return;
    }
    /* a long: its number of 15-bit digits, then the digits, least significant first */
    unsigned char digits[10][2];
    int n = 0;
    for (; v; v >>= 15, n++) {
        digits[n][0] = v & 0xff;
        digits[n][1] = (v >> 8) & 0x7f;
    }
    put(b, "l", 1);
    put_i32(b, n);
    put(b, digits, 2 * n);
}

static void put_key_str(struct buf *b, const char *key, const char *value)
{
    put_str(b, key);
    put_str(b, value);
}

static void put_key_bool(struct buf *b, const char *key, int value)
{
    put_str(b, key);
    put(b, value ? "T" : "F", 1);
}

/* -- what fastpath.parse takes ----------------------------------------------- */
struct request {
    const char *root, *image, *mountpoint, *upper, *container, *backend;
    int read_only, debug;
};

/* Only what needs no escaping or decoding to mean the same to Python. */
static int plain(const char *s)
{
    for (; *s; s++)
        if ((unsigned char)*s < 0x20 || (unsigned char)*s >= 0x7f)
            return 0;
    return 1;
}

/* An absolute path with no ".", ".." or empty component: os.path.abspath
 * would give it back as it is. */
static int normal_absolute(const char *p)
{
    if (p[0] != '/' || !plain(p))
        return 0;
    if (p[1] == '\0')
        return 1;
    for (const char *c = p + 1;; ) {
        const char *end = strchrnul(c, '/');
        size_t n = end - c;
        if (n == 0 || (n == 1 && c[0] == '.') || (n == 2 && c[0] == '.' && c[1] == '.'))
            return 0;
        if (*end == '\0')
            return 1;
        c = end + 1;
    }
}

static const char **value_slot(struct request *r, const char *flag)
{
    if (strcmp(flag, "--upper") == 0)
        return &r->upper;
    if (strcmp(flag, "--container") == 0)
        return &r->container;
    if (strcmp(flag, "--backend") == 0)
        return &r->backend;
    return NULL;
}

static int parse(int argc, char **argv, struct request *r)
{
    int at = 1;
    const char *positional[2];
    int npos = 0;

    memset(r, 0, sizeof *r);
    if (argc > 3 && strcmp(argv[1], "--root") == 0) {
        r->root = argv[2];
        if (!*r->root || r->root[0] == '-')
            return 0;
        at = 3;
    }
    if (at >= argc || strcmp(argv[at], "mount") != 0)
        return 0;
    for (int i = at + 1; i < argc; i++) {
        const char *a = argv[i];
        const char **slot = value_slot(r, a);
        if (strcmp(a, "--read-only") == 0) {
            r->read_only = 1;
        } else if (strcmp(a, "--debug") == 0) {
            r->debug = 1;
        } else if (slot != NULL) {
            if (i + 1 >= argc || argv[i + 1][0] == '-' || *slot != NULL)
                return 0;
            *slot = argv[++i];
        } else if (a[0] == '-' || npos == 2) {
            return 0;
        } else {
            positional[npos++] = a;
        }
    }
    if (npos != 2 || (r->backend && strcmp(r->backend, "fuse") != 0) || (r->upper && r->container))
        return 0;
    r->image = positional[0];
    r->mountpoint = positional[1];
    struct stat st;
    if (stat(r->mountpoint, &st) == 0 && !(S_ISDIR(st.st_mode) && access(r->mountpoint, R_OK) == 0))
        return 0; /* click's Path(file_okay=False) says so, with its usage text */
    const char *strings[] = {r->image, r->mountpoint, r->upper, r->container, r->backend};
    for (size_t i = 0; i < sizeof strings / sizeof *strings; i++)
        if (strings[i] != NULL && !plain(strings[i]))
            return 0;
    return 1;
}

/* The store's root as rootdir.default_root and os.path.abspath give it,
 * or 0 when that is not plain to say here. */
static int store_root(const struct request *r, const char *cwd, char *out, size_t size)
{
    const char *root = r->root, *env = getenv("LAYERFS_ROOT");
    int n;

    if (root == NULL && env != NULL && *env)
        root = env;
    if (root == NULL) {
        const char *xdg = getenv("XDG_DATA_HOME"), *home = getenv("HOME");
        if (geteuid() == 0)
            n = snprintf(out, size, "/var/lib/layerfs");
        else if (xdg != NULL && *xdg)
            n = snprintf(out, size, "%s/layerfs", xdg);
        else if (home != NULL && *home)
            n = snprintf(out, size, "%s/.local/share/layerfs", home);
        else
            return 0;
    } else if (root[0] == '/') {
        n = snprintf(out, size, "%s", root);
    } else {
        n = snprintf(out, size, "%s/%s", cwd, root);
    }
    if (n < 0 || (size_t)n >= size)
        return 0;
    while (n > 1 && out[n - 1] == '/')
        out[--n] = '\0';
    struct stat st;
    return normal_absolute(out) && stat(out, &st) == 0 && S_ISDIR(st.st_mode);
}

static void encode(const struct request *r, const char *cwd, struct buf *b)
{
    char mntns[64];
    struct stat st;
    ssize_t n = readlink("/proc/self/ns/mnt", mntns, sizeof mntns - 1);
    mode_t mask = umask(022);

    umask(mask);
    if (n <= 0 || stat("/", &st) != 0)
        python_cli();
    mntns[n] = '\0';
    b->len = 4; /* the frame's length goes first, filled in at the end */
    put(b, "{", 1);
    put_key_str(b, "op", "mount");
    put_key_str(b, "reply", "plain");
    put_key_bool(b, "read_only", r->read_only);
    put_key_bool(b, "debug", r->debug);
    put_key_str(b, "image", r->image);
    put_key_str(b, "mountpoint", r->mountpoint);
    if (r->upper)
        put_key_str(b, "upper", r->upper);
    if (r->container)
        put_key_str(b, "container", r->container);
    if (r->backend)
        put_key_str(b, "backend", r->backend);
    put_key_str(b, "cwd", cwd);
    put_str(b, "umask");
    put_uint(b, mask);
    put_key_str(b, "mntns", mntns);
    put_str(b, "rootdir");
    put(b, "(", 1);
    put_i32(b, 2);
    put_uint(b, st.st_dev);
    put_uint(b, st.st_ino);
    put_str(b, "env");
    put(b, "{", 1);
    for (char **e = environ; *e; e++) {
        char *eq = strchr(*e, '=');
        if (strncmp(*e, "LAYERFS_", 8) != 0 || eq == NULL)
            continue;
        if (!plain(*e))
            python_cli();
        put(b, "u", 1);
        put_i32(b, (int32_t)(eq - *e));
        put(b, *e, eq - *e);
        put_str(b, eq + 1);
    }
    put(b, "0", 1);
    put(b, "0", 1);
    size_t body = b->len - 4;
    unsigned char head[4] = {body >> 24, (body >> 16) & 0xff, (body >> 8) & 0xff, body & 0xff};
    memcpy(b->data, head, 4);
}

/* -- talking to the server ----------------------------------------------------- */
static int read_exact(int fd, void *p, size_t n)
{
    for (size_t got = 0; got < n;) {
        ssize_t k = read(fd, (char *)p + got, n - got);
        if (k < 0 && errno == EINTR)
            continue;
        if (k <= 0)
            return 0;
        got += k;
    }
    return 1;
}

/* The answer's frame, NUL-terminated; NULL if it did not come whole. */
static char *read_frame(int fd)
{
    unsigned char head[4];
    if (!read_exact(fd, head, 4))
        return NULL;
    uint32_t n = (uint32_t)head[0] << 24 | (uint32_t)head[1] << 16 | (uint32_t)head[2] << 8 | head[3];
    char *frame = n <= (1 << 20) ? malloc(n + 1) : NULL;
    if (frame == NULL || !read_exact(fd, frame, n)) {
        free(frame);
        return NULL;
    }
    frame[n] = '\0';
    return frame;
}

static int write_all(int fd, const void *p, size_t n)
{
    for (size_t done = 0; done < n;) {
        ssize_t k = write(fd, (const char *)p + done, n - done);
        if (k < 0 && errno == EINTR)
            continue;
        if (k <= 0)
            return 0;
        done += k;
    }
    return 1;
}

int main(int argc, char **argv)
{
    struct request r;
    char cwd[PATH_MAX], root[PATH_MAX];
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    static struct buf b;
    const char *off = getenv("LAYERFS_MOUNT_SERVER");

    args = argv;
    if ((off != NULL && strcmp(off, "off") == 0) || !parse(argc, argv, &r))
        python_cli();
    if (getcwd(cwd, sizeof cwd) == NULL || !plain(cwd) || !store_root(&r, cwd, root, sizeof root))
        python_cli();
    if (snprintf(addr.sun_path, sizeof addr.sun_path, "%s/mount-server/sock", root) >= 100)
        python_cli(); /* (mountclient.short_address's way round it is for Python to take) */
    encode(&r, cwd, &b);

    int sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    char taken;
    if (sock < 0 || connect(sock, (struct sockaddr *)&addr, sizeof addr) != 0)
        python_cli(); /* no server: the Python client starts one */
    if (!write_all(sock, b.data, b.len) || !read_exact(sock, &taken, 1) || taken != 'A')
        python_cli(); /* not taken: nothing was done, the Python client tries again */

    /* Taken: from here on the request must not be made twice. */
    char *reply = read_frame(sock);
    if (reply == NULL) {
        fprintf(stderr, "Error: the mount server's worker died; see %s/logs/mount-server.log\n", root);
        return 1;
    }
    /* "exit CODE\nTEXT": print TEXT on stderr, exit CODE; "fallback\n": the CLI's to do. */
    int code;
    char *text = strchr(reply, '\n');
    if (strncmp(reply, "fallback\n", 9) == 0)
        python_cli();
    if (text == NULL || sscanf(reply, "exit %d", &code) != 1) {
        fprintf(stderr, "Error: the mount server's answer is not understood\n");
        return 1;
    }
    fputs(text + 1, stderr);
    return code;
}
