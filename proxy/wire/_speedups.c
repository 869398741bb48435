/* proxy.wire._speedups: the frame-boundary loop of frames.py in C.
 *
 * Same contract as frames._scan_python (the reference implementation, which is used when
 * this module is not built, and which the tests compare it against byte for byte). The relay
 * calls this once per socket read in each direction; in Python the loop costs about 0.2 us
 * per frame, which on a 2-core box is ~10% of pgbench's TPS. Here it is noise.
 *
 * scan(buf, pos, table, max_length) -> (buf, pos, kinds, starts, flags, marked, after_marked, need)
 *   buf         bytes-like: the stream
 *   pos         where the first frame starts
 *   table       256 bytes: per frame type, bit 1 = report, bit 2 = mark (count), other bits
 *               are OR-ed into flags for reported frames
 *   max_length  largest allowed value of a length field
 * Returns buf itself; pos after the last whole frame; need = bytes the next frame needs in total (its
 * 1 + length once the header is known, else 5); kinds = type bytes of the reported frames;
 * starts = their offsets; flags = OR of their table values; marked = how many reported frames
 * had bit 2; after_marked = index into kinds just after the last marked one (0 if none).
 * A length below 4 or above max_length returns pos = -1, need = that length, and nothing
 * reported (empty kinds and starts, zero flags and counts). A negative pos is a ValueError.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

static PyObject *
scan(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer buf, table;
    Py_ssize_t pos;
    long long max_length;
    PyObject *kinds = NULL, *starts = NULL, *result = NULL;

    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "scan() takes 4 arguments");
        return NULL;
    }
    if (PyObject_GetBuffer(args[0], &buf, PyBUF_SIMPLE) < 0)
        return NULL;
    if (PyObject_GetBuffer(args[2], &table, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&buf);
        return NULL;
    }
    pos = PyLong_AsSsize_t(args[1]);
    max_length = PyLong_AsLongLong(args[3]);
    if (PyErr_Occurred())
        goto done;
    if (table.len != 256) {
        PyErr_SetString(PyExc_ValueError, "table must be 256 bytes");
        goto done;
    }
    if (pos < 0) {
        /* p[pos + 1] below would read before the buffer */
        PyErr_SetString(PyExc_ValueError, "pos must not be negative");
        goto done;
    }

    const unsigned char *p = (const unsigned char *)buf.buf;
    const unsigned char *t = (const unsigned char *)table.buf;
    Py_ssize_t end = buf.len;
    long long need = 5;
    unsigned flags = 0;
    Py_ssize_t marked = 0, after_marked = 0;

    /* kinds: at most one per 5 bytes of input */
    Py_ssize_t cap = (end > pos ? (end - pos) / 5 : 0) + 1;
    kinds = PyBytes_FromStringAndSize(NULL, cap);
    starts = PyList_New(0);
    if (kinds == NULL || starts == NULL)
        goto done;
    char *k = PyBytes_AS_STRING(kinds);
    Py_ssize_t nk = 0;

    while (end - pos >= 5) {
        int32_t length = (int32_t)(((uint32_t)p[pos + 1] << 24) | ((uint32_t)p[pos + 2] << 16) |
                                   ((uint32_t)p[pos + 3] << 8) | (uint32_t)p[pos + 4]);
        if (length < 4 || (long long)length > max_length) {
            /* as the reference: nothing reported, only the offending length */
            pos = -1;
            need = length;
            nk = 0;
            flags = 0;
            marked = after_marked = 0;
            if (PyList_SetSlice(starts, 0, PyList_GET_SIZE(starts), NULL) < 0)
                goto done;
            break;
        }
        Py_ssize_t stop = pos + 1 + (Py_ssize_t)length;
        if (stop > end) {
            need = 1 + (long long)length;
            break;
        }
        unsigned char typ = p[pos];
        unsigned char v = t[typ];
        if (v & 1) {
            PyObject *o = PyLong_FromSsize_t(pos);
            if (o == NULL || PyList_Append(starts, o) < 0) {
                Py_XDECREF(o);
                goto done;
            }
            Py_DECREF(o);
            k[nk++] = (char)typ;
            flags |= v;
            if (v & 2) {
                marked++;
                after_marked = nk;
            }
        }
        pos = stop;
    }
    if (_PyBytes_Resize(&kinds, nk) < 0)
        goto done;
    result = Py_BuildValue("(OnOOInnL)", args[0], pos, kinds, starts, flags, marked, after_marked, need);

done:
    Py_XDECREF(kinds);
    Py_XDECREF(starts);
    PyBuffer_Release(&buf);
    PyBuffer_Release(&table);
    return result;
}

static PyMethodDef methods[] = {
    {"scan", (PyCFunction)(void (*)(void))scan, METH_FASTCALL, "Find frame boundaries (see frames.py)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_speedups", "C loop for proxy.wire.frames.", -1, methods,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    return PyModule_Create(&module);
}
