/*
 * Lets the kernel cache directory listings of a layerfs FUSE mount.
 *
 * The kernel keeps a directory's readdir results in its page cache only
 * when OPENDIR answers with FOPEN_CACHE_DIR, and pyfuse3 (3.5) has no way
 * to set that flag. A filesystem that answers OPENDIR with ENOSYS gets the
 * same cache (Linux 5.1+, "fuse: cache readdir calls if filesystem opts out
 * of opendir") and no OPENDIR or RELEASEDIR request again; every READDIR
 * then carries file handle 0, and pyfuse3's readdir handler is not told
 * the inode. So this module wraps two of pyfuse3's low-level handlers:
 * OPENDIR is answered ENOSYS here, and READDIRPLUS reaches pyfuse3 with
 * the directory's inode number as its file handle.
 *
 * It does that by defining fuse_session_new: loaded with RTLD_GLOBAL
 * before pyfuse3 (fs/dircache.py), this definition is the one pyfuse3's
 * call binds to; it copies pyfuse3's handler table, swaps the two
 * handlers and calls libfuse's fuse_session_new with the copy. If pyfuse3
 * was loaded first, or calls libfuse by another name, nothing is swapped
 * and hooked() says so: the daemon then opens directories itself.
 */
#define _GNU_SOURCE
#define FUSE_USE_VERSION 31
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <dlfcn.h>
#include <errno.h>
#include <stddef.h>
#include <string.h>

#include <fuse3/fuse_lowlevel.h>

typedef struct fuse_session *(*session_new_fn)(struct fuse_args *, const struct fuse_lowlevel_ops *,
                                               size_t, void *);
typedef void (*readdir_fn)(fuse_req_t, fuse_ino_t, size_t, off_t, struct fuse_file_info *);

static int enabled = 1;     /* set_enabled(): swap handlers in the next sessions */
static int hooked;          /* the last session was made with the handlers swapped */
static readdir_fn pyfuse3_readdirplus;
static struct fuse_lowlevel_ops swapped;  /* libfuse copies it; kept for its lifetime anyway */

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

struct fuse_session *fuse_session_new(struct fuse_args *args, const struct fuse_lowlevel_ops *op,
                                      size_t op_size, void *userdata)
{
    static session_new_fn libfuse_session_new;

    if (libfuse_session_new == NULL)
        libfuse_session_new = (session_new_fn)dlsym(RTLD_NEXT, "fuse_session_new");
    if (libfuse_session_new == NULL)
        return NULL;
    hooked = 0;
    /* A table from newer headers than ours is passed on untouched. */
    if (!enabled || op == NULL || op_size != sizeof swapped || op->readdirplus == NULL)
        return libfuse_session_new(args, op, op_size, userdata);
    memcpy(&swapped, op, sizeof swapped);
    pyfuse3_readdirplus = op->readdirplus;
    swapped.opendir = opendir_unsupported;
    swapped.readdirplus = readdirplus_by_inode;
    swapped.releasedir = NULL;
    hooked = 1;
    return libfuse_session_new(args, &swapped, op_size, userdata);
}

static PyObject *py_hooked(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    return PyBool_FromLong(hooked);
}

static PyObject *py_set_enabled(PyObject *self, PyObject *arg)
{
    (void)self;
    int on = PyObject_IsTrue(arg);
    if (on < 0)
        return NULL;
    enabled = on;
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"hooked", py_hooked, METH_NOARGS,
     "Whether the last FUSE session was made with OPENDIR answered ENOSYS "
     "and the inode passed to readdir as its file handle."},
    {"set_enabled", py_set_enabled, METH_O, "Swap the handlers in sessions made from now on (default: yes)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_dircache", "pyfuse3 sessions whose directory listings the kernel caches.", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__dircache(void)
{
    return PyModule_Create(&module);
}
