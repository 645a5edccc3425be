/*
 * gramine-pf data nodes in bulk: one call decrypts and authenticates (or encrypts) a run of 4 KiB
 * nodes, each under its own AES-128-GCM key, with OpenSSL's EVP interface and the GIL released.
 *
 * Why this exists: every gramine-pf data node has its own key, so the pure-Python reader pays one
 * `cryptography` AESGCM object and one decrypt call per 4 KiB (about 2.2 us on the reference
 * machine, against 0.4 us for the AES-GCM work itself). Here the per-node cost is a key schedule
 * and the decryption. The Python reader stays the reference: it is used when this module is not
 * built, when SHIELDML_NO_NATIVE is set, and for everything but full runs of data nodes; the test
 * suite checks both give the same bytes and the same errors.
 *
 * The buffers come from Python and are checked here before any access: the key/tag slots of the
 * MHT node must cover every node, the source and the output must hold n nodes.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <openssl/evp.h>

#define NODE_SIZE 4096
#define KEY_SIZE 16
#define MAC_SIZE 16
#define SLOT_SIZE (KEY_SIZE + MAC_SIZE)

static EVP_CIPHER *aes128gcm; /* fetched once; immutable and shareable across threads */

/* Returns -1 when every node authenticates, else the index of the first that does not (its
 * output and the outputs after it are not defined), or -2 when OpenSSL could not set up. */
static Py_ssize_t decrypt_run(const unsigned char *slots, const unsigned char *src,
                              unsigned char *out, Py_ssize_t n)
{
    static const unsigned char iv[12] = {0};
    EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
    Py_ssize_t result = -1;
    if (ctx == NULL)
        return -2;
    for (Py_ssize_t i = 0; i < n; i++) {
        const unsigned char *key = slots + i * SLOT_SIZE;
        unsigned char tag[MAC_SIZE];
        unsigned char *o = out + i * NODE_SIZE;
        int len = 0, tail = 0;
        memcpy(tag, key + KEY_SIZE, MAC_SIZE);
        /* the cipher once, then only key and IV: re-initialising the cipher per node costs more
         * than decrypting the node */
        if (EVP_DecryptInit_ex2(ctx, i == 0 ? aes128gcm : NULL, key, iv, NULL) != 1
            || EVP_DecryptUpdate(ctx, o, &len, src + i * NODE_SIZE, NODE_SIZE) != 1
            || len != NODE_SIZE
            || EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_TAG, MAC_SIZE, tag) != 1
            || EVP_DecryptFinal_ex(ctx, o + len, &tail) != 1) {
            result = i;
            break;
        }
    }
    EVP_CIPHER_CTX_free(ctx);
    return result;
}

/* Encrypts n nodes from src into out, node i under keys[i], its key and tag into slots[i].
 * Returns 0, or -1 when OpenSSL failed (the outputs are then not defined). */
static int encrypt_run(const unsigned char *keys, const unsigned char *src, unsigned char *out,
                       unsigned char *slots, Py_ssize_t n)
{
    static const unsigned char iv[12] = {0};
    EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
    int result = 0;
    if (ctx == NULL)
        return -1;
    for (Py_ssize_t i = 0; i < n; i++) {
        const unsigned char *key = keys + i * KEY_SIZE;
        unsigned char *slot = slots + i * SLOT_SIZE;
        int len = 0, tail = 0;
        if (EVP_EncryptInit_ex2(ctx, i == 0 ? aes128gcm : NULL, key, iv, NULL) != 1
            || EVP_EncryptUpdate(ctx, out + i * NODE_SIZE, &len, src + i * NODE_SIZE, NODE_SIZE) != 1
            || len != NODE_SIZE
            || EVP_EncryptFinal_ex(ctx, out + i * NODE_SIZE + len, &tail) != 1
            || tail != 0
            || EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_GET_TAG, MAC_SIZE, slot + KEY_SIZE) != 1) {
            result = -1;
            break;
        }
        memcpy(slot, key, KEY_SIZE);
    }
    EVP_CIPHER_CTX_free(ctx);
    return result;
}

PyDoc_STRVAR(encrypt_nodes_doc,
"encrypt_nodes(keys, src, out, mht, first_slot, n) -> None\n\n"
"Encrypt n consecutive 4 KiB data nodes from src into out, node i under the 16-byte key\n"
"keys[16*i:16*i+16] (fresh random bytes from the caller), and store node i's key and tag in\n"
"MHT slot first_slot + i of the plaintext MHT node mht. Raises RuntimeError if OpenSSL fails.");

static PyObject *encrypt_nodes(PyObject *self, PyObject *args)
{
    Py_buffer keys, src, out, mht;
    Py_ssize_t first_slot, n;
    int result;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*y*w*w*nn", &keys, &src, &out, &mht, &first_slot, &n))
        return NULL;
    if (first_slot < 0 || n < 0 || n > PY_SSIZE_T_MAX / NODE_SIZE
        || first_slot > mht.len / SLOT_SIZE || n > mht.len / SLOT_SIZE - first_slot
        || keys.len < n * KEY_SIZE || src.len < n * NODE_SIZE || out.len < n * NODE_SIZE) {
        PyBuffer_Release(&keys);
        PyBuffer_Release(&src);
        PyBuffer_Release(&out);
        PyBuffer_Release(&mht);
        PyErr_SetString(PyExc_ValueError, "encrypt_nodes: buffers too small for n nodes");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    result = encrypt_run((const unsigned char *)keys.buf, (const unsigned char *)src.buf,
                         (unsigned char *)out.buf,
                         (unsigned char *)mht.buf + first_slot * SLOT_SIZE, n);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&keys);
    PyBuffer_Release(&src);
    PyBuffer_Release(&out);
    PyBuffer_Release(&mht);
    if (result != 0) {
        PyErr_SetString(PyExc_RuntimeError, "encrypt_nodes: OpenSSL AES-128-GCM failed");
        return NULL;
    }
    Py_RETURN_NONE;
}

PyDoc_STRVAR(decrypt_nodes_doc,
"decrypt_nodes(mht, first_slot, src, out, n) -> int\n\n"
"Decrypt n consecutive 4 KiB data nodes from src into out; node i's key and tag are MHT slot\n"
"first_slot + i of the decrypted MHT node mht. Returns -1 when all authenticate, else the index\n"
"of the first node that does not (out is then not defined and must be discarded).");

static PyObject *decrypt_nodes(PyObject *self, PyObject *args)
{
    Py_buffer mht, src, out;
    Py_ssize_t first_slot, n, result;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*ny*w*n", &mht, &first_slot, &src, &out, &n))
        return NULL;
    if (first_slot < 0 || n < 0 || n > PY_SSIZE_T_MAX / NODE_SIZE
        || first_slot > mht.len / SLOT_SIZE || n > mht.len / SLOT_SIZE - first_slot
        || src.len < n * NODE_SIZE || out.len < n * NODE_SIZE) {
        PyBuffer_Release(&mht);
        PyBuffer_Release(&src);
        PyBuffer_Release(&out);
        PyErr_SetString(PyExc_ValueError, "decrypt_nodes: buffers too small for n nodes");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    result = decrypt_run((const unsigned char *)mht.buf + first_slot * SLOT_SIZE,
                         (const unsigned char *)src.buf, (unsigned char *)out.buf, n);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&mht);
    PyBuffer_Release(&src);
    PyBuffer_Release(&out);
    if (result == -2) {
        PyErr_NoMemory();
        return NULL;
    }
    return PyLong_FromSsize_t(result);
}

static PyMethodDef methods[] = {
    {"decrypt_nodes", decrypt_nodes, METH_VARARGS, decrypt_nodes_doc},
    {"encrypt_nodes", encrypt_nodes, METH_VARARGS, encrypt_nodes_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_pfnative",
    "gramine-pf data nodes decrypted in bulk with OpenSSL (optional accelerator).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__pfnative(void)
{
    if (aes128gcm == NULL) {
        aes128gcm = EVP_CIPHER_fetch(NULL, "AES-128-GCM", NULL);
        if (aes128gcm == NULL) {
            PyErr_SetString(PyExc_ImportError, "OpenSSL has no AES-128-GCM");
            return NULL;
        }
    }
    return PyModule_Create(&module);
}
