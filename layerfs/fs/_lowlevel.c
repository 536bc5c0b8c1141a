/*
 * What pyfuse3 (3.5) cannot do, done at libfuse's low level:
 *
 * - Let the kernel cache directory listings. The kernel keeps a
 *   directory's readdir results in its page cache only when OPENDIR answers
 *   with FOPEN_CACHE_DIR, and pyfuse3 has no way to set that flag. A
 *   filesystem that answers OPENDIR with ENOSYS gets the same cache (Linux
 *   5.1+, "fuse: cache readdir calls if filesystem opts out of opendir")
 *   and no OPENDIR or RELEASEDIR request again; every READDIR then carries
 *   file handle 0, and pyfuse3's readdir handler is not told the inode. So
 *   OPENDIR is answered ENOSYS here, and READDIRPLUS reaches pyfuse3 with
 *   the directory's inode number as its file handle.
 *
 * - Answer FALLOCATE, which pyfuse3 has no handler for (the kernel would
 *   tell every caller EOPNOTSUPP, where overlayfs passes the call on to the
 *   upper file): fallocate(2) runs here, with the GIL released, on the
 *   upper file's descriptor that the handle's `served` tuple names (below).
 *
 * - Answer LSEEK for SEEK_DATA and SEEK_HOLE, which pyfuse3 has no handler
 *   for either (the kernel would call every file all data, where overlayfs
 *   shows the holes of the file below): another callable gives the answer.
 *
 * - Answer READ and WRITE of open files whose data needs no more checks
 *   without entering Python (fio's READs of a checked object: ~75 us of
 *   daemon CPU each through pyfuse3's handler and loop, ~30 us here, with
 *   serve_stream below). The daemon gives the module its dict of handles
 *   (fh -> handle object); a handle whose `served` attribute is a tuple
 *   (fd or bytes, size or -1, read mode, lower, chunk states or None,
 *   chunk size) is answered here: by preadv2 on the fd (RWF_NOWAIT where
 *   the daemon reads without waiting for a disk: a miss goes to pyfuse3's
 *   handler, which waits in a worker thread), or from the bytes; with
 *   chunk states (a big object being checked for a random reader), only
 *   where every chunk the READ covers matched. A lower handle whose node
 *   was copied up since (`handle.node.upper`), a short read that is not
 *   the end of the file, and anything unexpected go to pyfuse3's handler,
 *   which decides (and may set `served` again). WRITE is answered by
 *   pwrite on an upper file's fd. The GIL is released around the
 *   syscalls. (The dict is given to the module in any case, for FALLOCATE;
 *   whether READ and WRITE are hooked is set_file_ops' third argument.)
 *
 * - Ask the kernel to leave the umask to the filesystem (FUSE_DONT_MASK),
 *   which pyfuse3 never asks for: with POSIX ACLs on, a node made in a dir
 *   with a default ACL must get that ACL's bits, not the umask's (POSIX;
 *   overlayfs does it). The daemon applies the umask the request carries
 *   where there is no default ACL.
 *
 * All by defining fuse_session_new: loaded with RTLD_GLOBAL before
 * pyfuse3 (fs/lowlevel.py), this definition is the one pyfuse3's call
 * binds to; it copies pyfuse3's handler table, swaps the handlers and
 * calls libfuse's fuse_session_new with the copy. If pyfuse3 was loaded
 * first, or calls libfuse by another name, nothing is swapped and
 * hooked() says so: the daemon then opens directories itself, FALLOCATE
 * stays unsupported and every file reads as all data.
 */
#define _GNU_SOURCE
#define FUSE_USE_VERSION 31
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <poll.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <time.h>

#include <linux/fuse.h>

#include <fuse3/fuse_lowlevel.h>

typedef struct fuse_session *(*session_new_fn)(struct fuse_args *, const struct fuse_lowlevel_ops *,
                                               size_t, void *);
typedef void (*readdir_fn)(fuse_req_t, fuse_ino_t, size_t, off_t, struct fuse_file_info *);
typedef readdir_fn read_fn;
typedef void (*write_buf_fn)(fuse_req_t, fuse_ino_t, struct fuse_bufvec *, off_t, struct fuse_file_info *);

/* How a handle's fd is read (files.py: NOWAIT, INLINE, THREAD): with
 * RWF_NOWAIT, plainly (a memory filesystem), or not here (the disk may
 * make the loop wait: pyfuse3's handler reads in a worker thread). */
enum { READ_NOWAIT, READ_INLINE, READ_THREAD };
#define CHUNK_GOOD 2  /* bigread.GOOD: a chunk that matched its sum */

static int cache_listings = 1;  /* set_cache_listings(): swap the listing handlers in the next sessions */
static int listings_hooked;     /* the last session was made with the listing handlers swapped */
static int file_ops_hooked;     /* ... with FALLOCATE and LSEEK answered here, and DONT_MASK asked for */
static int io_hooked;           /* ... with READ and WRITE answered here where the handle says so */
static int answer_io;           /* set_file_ops(): hook READ and WRITE in the next sessions */
static PyObject *seek_data;     /* (fh, offset, whence) -> offset, or -errno (set_file_ops) */
static PyObject *handles;       /* fh -> handle object, for FALLOCATE, READ and WRITE (set_file_ops) */
static PyObject *name_served, *name_node, *name_upper;  /* attribute names, made once */
static unsigned long long reads_answered, writes_answered;
static readdir_fn pyfuse3_readdirplus;
static read_fn pyfuse3_read;
static write_buf_fn pyfuse3_write_buf;
static struct fuse_lowlevel_ops swapped;  /* libfuse copies it; kept for its lifetime anyway */
static struct fuse_session *session;  /* the last one made */
static int streaming;   /* serve_stream() runs: READ/WRITE handlers start no stream of their own */
static int handed_on;   /* the last READ or WRITE went to pyfuse3's handler */

#define STREAM_MAX 64            /* requests answered in a row before the trio loop runs again */
#define STREAM_WAIT_NS 30000     /* how long to wait for the next request of a stream (loop.SPIN) */

typedef void (*init_fn)(void *, struct fuse_conn_info *);
static init_fn pyfuse3_init;

static void init_dont_mask(void *userdata, struct fuse_conn_info *conn)
{
    pyfuse3_init(userdata, conn);
    if (conn->capable & FUSE_CAP_DONT_MASK)
        conn->want |= FUSE_CAP_DONT_MASK;
}

static void opendir_unsupported(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    (void)ino;
    (void)fi;
    fuse_reply_err(req, ENOSYS);
}

static void readdirplus_by_inode(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
                                 struct fuse_file_info *fi)
{
    fi->fh = ino;
    pyfuse3_readdirplus(req, ino, size, off, fi);
}

/* What *fn* returns for the arguments (a number, or -errno); an exception
 * is reported (the daemon's log) and taken for EIO. Called with the GIL. */
static long long ask(PyObject *fn, const char *format, ...)
{
    if (fn == NULL)
        return -EOPNOTSUPP;
    va_list va;
    va_start(va, format);
    PyObject *args = Py_VaBuildValue(format, va);
    va_end(va);
    PyObject *got = args == NULL ? NULL : PyObject_CallObject(fn, args);
    long long n = got == NULL ? -1 : PyLong_AsLongLong(got);
    Py_XDECREF(args);
    Py_XDECREF(got);
    if (PyErr_Occurred()) {
        PyErr_WriteUnraisable(fn);
        return -EIO;
    }
    return n;
}

/* The `served` tuple of handle *fh* (a new reference), or NULL if its
 * requests are pyfuse3's to answer. Called with the GIL. */
static PyObject *served(uint64_t fh)
{
    if (handles == NULL)
        return NULL;
    PyObject *key = PyLong_FromUnsignedLongLong(fh);
    PyObject *handle = key == NULL ? NULL : PyDict_GetItemWithError(handles, key);  /* borrowed */
    Py_XDECREF(key);
    PyObject *how = handle == NULL ? NULL : PyObject_GetAttr(handle, name_served);
    if (how == NULL || !PyTuple_CheckExact(how) || PyTuple_GET_SIZE(how) != 6) {
        Py_XDECREF(how);
        PyErr_Clear();
        return NULL;
    }
    if (PyObject_IsTrue(PyTuple_GET_ITEM(how, 3)) == 1) {  /* lower: not if copied up since */
        PyObject *node = PyObject_GetAttr(handle, name_node);
        PyObject *upper = node == NULL ? NULL : PyObject_GetAttr(node, name_upper);
        int moved = upper == NULL ? -1 : PyObject_IsTrue(upper);
        Py_XDECREF(node);
        Py_XDECREF(upper);
        if (moved != 0) {
            Py_DECREF(how);
            PyErr_Clear();
            return NULL;
        }
    }
    return how;
}

/* The fd of the upper file that handle *fh* has open, -1 if it has none
 * (the kernel sends FALLOCATE and WRITE only for a file open for writing,
 * which is in the upper dir since its open). Called with the GIL. */
static int upper_fd(uint64_t fh)
{
    PyObject *how = served(fh);
    if (how == NULL)
        return -1;
    PyObject *source = PyTuple_GET_ITEM(how, 0);
    long fd = PyObject_IsTrue(PyTuple_GET_ITEM(how, 3)) == 0 && PyLong_Check(source) ? PyLong_AsLong(source) : -1;
    Py_DECREF(how);
    PyErr_Clear();
    return (int)fd;
}

static void fallocate_upper(fuse_req_t req, fuse_ino_t ino, int mode, off_t off, off_t length,
                            struct fuse_file_info *fi)
{
    (void)ino;
    /* pyfuse3 calls handlers with the GIL held; Ensure is cheap then */
    PyGILState_STATE gil = PyGILState_Ensure();
    int fd = upper_fd(fi->fh);
    int err = handles == NULL ? EOPNOTSUPP : fd < 0 ? EBADF : 0;
    if (fd >= 0) {
        Py_BEGIN_ALLOW_THREADS
        if (fallocate(fd, mode, off, length) != 0)
            err = errno;
        Py_END_ALLOW_THREADS
    }
    PyGILState_Release(gil);
    fuse_reply_err(req, err);
}

static void lseek_data(fuse_req_t req, fuse_ino_t ino, off_t off, int whence, struct fuse_file_info *fi)
{
    (void)ino;
    PyGILState_STATE gil = PyGILState_Ensure();
    long long got = ask(seek_data, "(KLi)", (unsigned long long)fi->fh, (long long)off, whence);
    PyGILState_Release(gil);
    if (got < 0)
        fuse_reply_err(req, (int)-got);
    else
        fuse_reply_lseek(req, (off_t)got);
}

/* Whether *n* bytes read at *off* are all a READ of *size* gets: all it
 * asked for, or all up to the end of the file (*known* bytes long, or as
 * long as fstat says if *known* < 0). */
static int whole_read(int fd, ssize_t n, size_t size, off_t off, long long known)
{
    if (n < 0)
        return 0;
    if ((size_t)n == size)
        return 1;
    if (known < 0) {
        struct stat st;
        if (fstat(fd, &st) != 0)
            return 0;
        known = st.st_size;
    }
    return off + n >= known;
}

/* Answer a READ by preadv2; 0 if it was not answered. Called with the GIL,
 * which is released meanwhile (only the request loop's thread comes here,
 * so one buffer serves). */
static int reply_pread(fuse_req_t req, int fd, size_t size, off_t off, long long known, int nowait)
{
    static char *buf;
    static size_t buf_len;
    if (size > buf_len) {
        char *bigger = realloc(buf, size);
        if (bigger == NULL)
            return 0;
        buf = bigger;
        buf_len = size;
    }
    int answered = 0;
    Py_BEGIN_ALLOW_THREADS
    struct iovec iov = {buf, size};
    ssize_t n = preadv2(fd, &iov, 1, off, nowait ? RWF_NOWAIT : 0);
    if (whole_read(fd, n, size, off, known)) {
        fuse_reply_buf(req, buf, (size_t)n);
        answered = 1;
    }
    Py_END_ALLOW_THREADS
    return answered;
}

static int reply_bytes(fuse_req_t req, PyObject *data, size_t size, off_t off)
{
    Py_ssize_t len = PyBytes_GET_SIZE(data);
    if (off >= len)
        return fuse_reply_buf(req, NULL, 0), 1;
    size_t n = (size_t)(len - off) < size ? (size_t)(len - off) : size;
    fuse_reply_buf(req, PyBytes_AS_STRING(data) + off, n);  /* (the GIL keeps *data* alive) */
    return 1;
}

/* Whether every chunk of *states* (a bytearray, one state per *chunk*
 * bytes: files.py's chunk states, CHUNK_GOOD final) that a READ of *size*
 * bytes at *off* covers has matched its sum; None: no chunks to check. */
static int chunks_good(PyObject *states, long long chunk, size_t size, off_t off)
{
    if (states == Py_None)
        return 1;
    if (!PyByteArray_CheckExact(states) || chunk <= 0 || size == 0)
        return 0;
    Py_ssize_t first = off / chunk, last = (off + (off_t)size - 1) / chunk;
    Py_ssize_t n = PyByteArray_GET_SIZE(states);
    const char *state = PyByteArray_AS_STRING(states);
    for (Py_ssize_t i = first; i <= last && i < n; i++)
        if (state[i] != CHUNK_GOOD)
            return 0;
    return first < n;
}

static int answer_read(fuse_req_t req, size_t size, off_t off, uint64_t fh)
{
    if (off < 0)  /* (the kernel sends none; chunks_good and reply_bytes index by it) */
        return 0;
    PyObject *how = served(fh);
    if (how == NULL)
        return 0;
    PyObject *source = PyTuple_GET_ITEM(how, 0);
    int answered = 0;
    if (!chunks_good(PyTuple_GET_ITEM(how, 4), PyLong_AsLongLong(PyTuple_GET_ITEM(how, 5)), size, off)) {
        PyErr_Clear();
    } else if (PyBytes_CheckExact(source)) {
        answered = reply_bytes(req, source, size, off);
    } else {
        long fd = PyLong_AsLong(source);
        long long known = PyLong_AsLongLong(PyTuple_GET_ITEM(how, 1));
        long mode = PyLong_AsLong(PyTuple_GET_ITEM(how, 2));
        if (PyErr_Occurred())
            PyErr_Clear();
        else if (mode == READ_NOWAIT || mode == READ_INLINE)
            answered = reply_pread(req, (int)fd, size, off, known, mode == READ_NOWAIT);
    }
    Py_DECREF(how);
    reads_answered += answered;
    return answered;
}

/* Whether a request is waiting on *fd* or comes within STREAM_WAIT_NS
 * (polled, the GIL released: waking a sleeping process costs more than
 * that on a VM). */
static int request_soon(int fd)
{
    struct pollfd p = {.fd = fd, .events = POLLIN};
    struct timespec start, now;
    int ready;
    Py_BEGIN_ALLOW_THREADS
    clock_gettime(CLOCK_MONOTONIC, &start);
    do {
        ready = poll(&p, 1, 0) > 0;
        clock_gettime(CLOCK_MONOTONIC, &now);
    } while (!ready && (now.tv_sec - start.tv_sec) * 1000000000L + (now.tv_nsec - start.tv_nsec) < STREAM_WAIT_NS);
    Py_END_ALLOW_THREADS
    return ready;
}

/* After a READ or WRITE answered here: go on receiving and answering the
 * requests that follow it as long as they are READs and WRITEs answered
 * here, without a return to pyfuse3's loop (a sequential reader's next
 * READ comes within microseconds). The first other request is processed
 * as pyfuse3's loop would (its handler leaves a coroutine that the loop
 * awaits once this returns) and ends the stream: pyfuse3 runs one handler
 * per request it received. At most STREAM_MAX requests, so the trio loop
 * (thread results, signals) keeps running. Called with the GIL, in the
 * request loop's thread, which is the only one that reads the FUSE fd. */
static void serve_stream(void)
{
    static struct fuse_buf buf;  /* (its memory is libfuse's, kept for the next stream) */
    if (session == NULL)
        return;
    int fd = fuse_session_fd(session);
    int flags = -1;
    streaming = 1;
    for (int i = 0; i < STREAM_MAX && !fuse_session_exited(session) && request_soon(fd); i++) {
        /* Non-blocking while the stream reads (set once a request waits: a
         * lone READ costs no syscall for it): a request can leave the queue
         * between poll and read (its caller was killed), and a blocking
         * read would then hold the trio loop until some other request came. */
        if (flags < 0 && ((flags = fcntl(fd, F_GETFL)) < 0 || fcntl(fd, F_SETFL, flags | O_NONBLOCK) < 0)) {
            flags = -1;
            break;
        }
        int got = fuse_session_receive_buf(session, &buf);
        if (got <= 0)  /* EAGAIN; or an error or the exit, which pyfuse3's loop meets at its next read */
            break;
        int fast = !(buf.flags & FUSE_BUF_IS_FD) && (size_t)got >= sizeof(struct fuse_in_header);
        if (fast) {
            uint32_t op = ((const struct fuse_in_header *)buf.mem)->opcode;
            fast = op == FUSE_READ || op == FUSE_WRITE;
        }
        handed_on = 0;
        fuse_session_process_buf(session, &buf);
        if (!fast || handed_on)
            break;
    }
    streaming = 0;
    if (flags >= 0)
        fcntl(fd, F_SETFL, flags);
}

/* After a READ or WRITE: the stream goes on from one answered here; one
 * handed to pyfuse3's handler ends it. */
static void after(int answered)
{
    if (!answered)
        handed_on = 1;
    else if (!streaming)
        serve_stream();
}

static void read_served(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi)
{
    PyGILState_STATE gil = PyGILState_Ensure();
    int answered = answer_read(req, size, off, fi->fh);
    if (!answered)
        pyfuse3_read(req, ino, size, off, fi);
    after(answered);
    PyGILState_Release(gil);
}

/* Answer a WRITE to an upper file (fuse_buf_copy: a pwrite); 0 if it was
 * not answered. */
static int answer_write(fuse_req_t req, struct fuse_bufvec *data, off_t off, uint64_t fh)
{
    int fd = upper_fd(fh);
    if (fd < 0)
        return 0;
    Py_BEGIN_ALLOW_THREADS
    struct fuse_bufvec to = FUSE_BUFVEC_INIT(fuse_buf_size(data));
    to.buf[0].flags = FUSE_BUF_IS_FD | FUSE_BUF_FD_SEEK;
    to.buf[0].fd = fd;
    to.buf[0].pos = off;
    ssize_t n = fuse_buf_copy(&to, data, 0);
    if (n < 0)
        fuse_reply_err(req, (int)-n);
    else
        fuse_reply_write(req, (size_t)n);
    Py_END_ALLOW_THREADS
    writes_answered++;
    return 1;
}

static void write_served(fuse_req_t req, fuse_ino_t ino, struct fuse_bufvec *data, off_t off,
                         struct fuse_file_info *fi)
{
    PyGILState_STATE gil = PyGILState_Ensure();
    int answered = answer_write(req, data, off, fi->fh);
    if (!answered)
        pyfuse3_write_buf(req, ino, data, off, fi);
    after(answered);
    PyGILState_Release(gil);
}

struct fuse_session *fuse_session_new(struct fuse_args *args, const struct fuse_lowlevel_ops *op,
                                      size_t op_size, void *userdata)
{
    static session_new_fn libfuse_session_new;

    if (libfuse_session_new == NULL)
        libfuse_session_new = (session_new_fn)dlsym(RTLD_NEXT, "fuse_session_new");
    if (libfuse_session_new == NULL)
        return NULL;
    listings_hooked = file_ops_hooked = io_hooked = 0;
    session = NULL;
    /* A table from newer headers than ours is passed on untouched. */
    if (op == NULL || op_size != sizeof swapped || op->readdirplus == NULL)
        return libfuse_session_new(args, op, op_size, userdata);
    memcpy(&swapped, op, sizeof swapped);
    if (cache_listings) {
        pyfuse3_readdirplus = op->readdirplus;
        swapped.opendir = opendir_unsupported;
        swapped.readdirplus = readdirplus_by_inode;
        swapped.releasedir = NULL;
        listings_hooked = 1;
    }
    if (swapped.fallocate == NULL && swapped.lseek == NULL && op->init != NULL) {
        swapped.fallocate = fallocate_upper;
        swapped.lseek = lseek_data;
        pyfuse3_init = op->init;
        swapped.init = init_dont_mask;
        file_ops_hooked = 1;
    }
    if (answer_io && handles != NULL && op->read != NULL && op->write_buf != NULL) {
        pyfuse3_read = op->read;
        pyfuse3_write_buf = op->write_buf;
        swapped.read = read_served;
        swapped.write_buf = write_served;
        io_hooked = 1;
    }
    session = libfuse_session_new(args, &swapped, op_size, userdata);
    return session;
}

static PyObject *py_hooked(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    return Py_BuildValue("(OOO)", listings_hooked ? Py_True : Py_False, file_ops_hooked ? Py_True : Py_False,
                         io_hooked ? Py_True : Py_False);
}

static PyObject *py_set_cache_listings(PyObject *self, PyObject *arg)
{
    (void)self;
    int on = PyObject_IsTrue(arg);
    if (on < 0)
        return NULL;
    cache_listings = on;
    Py_RETURN_NONE;
}

static PyObject *py_set_file_ops(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *lseek, *by_fh;
    int io;
    if (!PyArg_ParseTuple(args, "OO!p", &lseek, &PyDict_Type, &by_fh, &io))
        return NULL;
    if (!PyCallable_Check(lseek)) {
        PyErr_SetString(PyExc_TypeError, "set_file_ops: lseek must be callable");
        return NULL;
    }
    Py_XSETREF(seek_data, Py_NewRef(lseek));
    Py_XSETREF(handles, Py_NewRef(by_fh));
    answer_io = io;
    Py_RETURN_NONE;
}

static PyObject *py_answered(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    return Py_BuildValue("(KK)", reads_answered, writes_answered);
}

static PyMethodDef methods[] = {
    {"hooked", py_hooked, METH_NOARGS,
     "(listings cached by the kernel, FALLOCATE and LSEEK answered, READ and WRITE answered) for the last "
     "FUSE session made."},
    {"answered", py_answered, METH_NOARGS, "(READs, WRITEs) answered by the module so far."},
    {"set_cache_listings", py_set_cache_listings, METH_O,
     "Answer OPENDIR ENOSYS and pass readdir the inode as its file handle, in sessions made from now on "
     "(default: yes)."},
    {"set_file_ops", py_set_file_ops, METH_VARARGS,
     "set_file_ops(lseek, handles, answer_io): the callable LSEEK asks for (fh, offset, whence)'s answer "
     "(or -errno); the dict of handles by fh, whose `served` tuples FALLOCATE (and READ and WRITE) follow; "
     "whether READ and WRITE are answered here, in sessions made from now on."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_lowlevel", "pyfuse3 sessions with what pyfuse3 cannot do done at libfuse's level.",
    -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__lowlevel(void)
{
    name_served = PyUnicode_InternFromString("served");
    name_node = PyUnicode_InternFromString("node");
    name_upper = PyUnicode_InternFromString("upper");
    if (name_served == NULL || name_node == NULL || name_upper == NULL)
        return NULL;
    return PyModule_Create(&module);
}
