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
 *   upper file). The daemon registers a callable that maps a file handle
 *   to the upper file's descriptor (or -errno); fallocate(2) runs on that
 *   descriptor here, with the GIL released.
 *
 * - Answer LSEEK for SEEK_DATA and SEEK_HOLE, which pyfuse3 has no handler
 *   for either (the kernel would call every file all data, where overlayfs
 *   shows the holes of the file below): another callable gives the answer.
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
#include <string.h>

#include <fuse3/fuse_lowlevel.h>

typedef struct fuse_session *(*session_new_fn)(struct fuse_args *, const struct fuse_lowlevel_ops *,
                                               size_t, void *);
typedef void (*readdir_fn)(fuse_req_t, fuse_ino_t, size_t, off_t, struct fuse_file_info *);

static int cache_listings = 1;  /* set_cache_listings(): swap the listing handlers in the next sessions */
static int listings_hooked;     /* the last session was made with the listing handlers swapped */
static int file_ops_hooked;     /* ... with FALLOCATE and LSEEK answered here, and DONT_MASK asked for */
static readdir_fn pyfuse3_readdirplus;
static PyObject *fallocate_fd;  /* fh -> fd of the upper file, or -errno (set_file_ops) */
static PyObject *seek_data;     /* (fh, offset, whence) -> offset, or -errno (set_file_ops) */
static struct fuse_lowlevel_ops swapped;  /* libfuse copies it; kept for its lifetime anyway */

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

static void fallocate_upper(fuse_req_t req, fuse_ino_t ino, int mode, off_t off, off_t length,
                            struct fuse_file_info *fi)
{
    (void)ino;
    int err = 0;
    /* pyfuse3 calls handlers with the GIL held; Ensure is cheap then */
    PyGILState_STATE gil = PyGILState_Ensure();
    long long fd = ask(fallocate_fd, "(K)", (unsigned long long)fi->fh);
    if (fd < 0) {
        err = (int)-fd;
    } else {
        Py_BEGIN_ALLOW_THREADS
        if (fallocate((int)fd, mode, off, length) != 0)
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

struct fuse_session *fuse_session_new(struct fuse_args *args, const struct fuse_lowlevel_ops *op,
                                      size_t op_size, void *userdata)
{
    static session_new_fn libfuse_session_new;

    if (libfuse_session_new == NULL)
        libfuse_session_new = (session_new_fn)dlsym(RTLD_NEXT, "fuse_session_new");
    if (libfuse_session_new == NULL)
        return NULL;
    listings_hooked = file_ops_hooked = 0;
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
    return libfuse_session_new(args, &swapped, op_size, userdata);
}

static PyObject *py_hooked(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    return Py_BuildValue("(OO)", listings_hooked ? Py_True : Py_False, file_ops_hooked ? Py_True : Py_False);
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
    PyObject *fallocate, *lseek;
    if (!PyArg_ParseTuple(args, "OO", &fallocate, &lseek))
        return NULL;
    if (!PyCallable_Check(fallocate) || !PyCallable_Check(lseek)) {
        PyErr_SetString(PyExc_TypeError, "set_file_ops takes two callables");
        return NULL;
    }
    Py_XSETREF(fallocate_fd, Py_NewRef(fallocate));
    Py_XSETREF(seek_data, Py_NewRef(lseek));
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"hooked", py_hooked, METH_NOARGS,
     "(listings cached by the kernel, FALLOCATE and LSEEK answered) for the last FUSE session made."},
    {"set_cache_listings", py_set_cache_listings, METH_O,
     "Answer OPENDIR ENOSYS and pass readdir the inode as its file handle, in sessions made from now on "
     "(default: yes)."},
    {"set_file_ops", py_set_file_ops, METH_VARARGS,
     "set_file_ops(fallocate_fd, lseek): the callables FALLOCATE asks for a file handle's upper file "
     "descriptor, and LSEEK for (fh, offset, whence)'s answer (both: or -errno)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_lowlevel", "pyfuse3 sessions with what pyfuse3 cannot do done at libfuse's level.",
    -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__lowlevel(void)
{
    return PyModule_Create(&module);
}
