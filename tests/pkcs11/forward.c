/*
 * Test-only PKCS#11 module that forwards to a real one (SoftHSM2) and injects faults.
 * Never part of the shipped plugin: tests/pkcs11_serve.rs compiles it with `cc -shared -fPIC`
 * into a temporary directory and points `--pkcs11-module` at the result.
 *
 * C_GetFunctionList dlopens the real module named by $KMS_TEST_FWD_MODULE, copies its function
 * table and overrides a few entries. Files in the directory $KMS_TEST_FWD_DIR drive the faults:
 *
 *   hang              C_Encrypt, C_Decrypt and C_FindObjects block while this file exists.
 *   logout-at-FN      FN is C_FindObjectsInit, C_EncryptInit or C_DecryptInit: the next call of FN
 *                     removes the file and calls the real C_Logout on its session first (the token
 *                     drops the login behind the plugin's back), then forwards the call.
 *   no-token          C_GetSlotList reports no slot with a token, C_GetTokenInfo and C_OpenSession
 *                     answer CKR_TOKEN_NOT_PRESENT (the HSM is not there yet).
 *   fail-init         C_Initialize answers CKR_DEVICE_ERROR.
 *
 * Every C_OpenSession, C_CloseSession, C_Login, injected C_Logout and entry into a hang appends one
 * line to $KMS_TEST_FWD_DIR/events, so a test can count them.
 *
 * Only the few PKCS#11 types used here are declared (no header needed); the function table layout
 * is that of PKCS#11 2.40, which is what SoftHSM2 exports.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

typedef unsigned long CK_ULONG;
typedef CK_ULONG CK_RV, CK_SLOT_ID, CK_SESSION_HANDLE, CK_OBJECT_HANDLE, CK_FLAGS, CK_USER_TYPE;
typedef unsigned char CK_BYTE, CK_BBOOL;
typedef struct { CK_BYTE major, minor; } CK_VERSION;
typedef CK_RV (*ANY_FN)(void); /* entries that are copied, never called, here */

#define CKR_OK 0x00UL
#define CKR_GENERAL_ERROR 0x05UL
#define CKR_DEVICE_ERROR 0x30UL
#define CKR_TOKEN_NOT_PRESENT 0xE0UL

typedef struct CK_FUNCTION_LIST CK_FUNCTION_LIST;
struct CK_FUNCTION_LIST {
    CK_VERSION version;
    CK_RV (*C_Initialize)(void *);
    ANY_FN C_Finalize, C_GetInfo;
    CK_RV (*C_GetFunctionList)(CK_FUNCTION_LIST **);
    CK_RV (*C_GetSlotList)(CK_BBOOL, CK_SLOT_ID *, CK_ULONG *);
    ANY_FN C_GetSlotInfo;
    CK_RV (*C_GetTokenInfo)(CK_SLOT_ID, void *);
    ANY_FN C_GetMechanismList, C_GetMechanismInfo, C_InitToken, C_InitPIN, C_SetPIN;
    CK_RV (*C_OpenSession)(CK_SLOT_ID, CK_FLAGS, void *, void *, CK_SESSION_HANDLE *);
    CK_RV (*C_CloseSession)(CK_SESSION_HANDLE);
    ANY_FN C_CloseAllSessions, C_GetSessionInfo, C_GetOperationState, C_SetOperationState;
    CK_RV (*C_Login)(CK_SESSION_HANDLE, CK_USER_TYPE, CK_BYTE *, CK_ULONG);
    CK_RV (*C_Logout)(CK_SESSION_HANDLE);
    ANY_FN C_CreateObject, C_CopyObject, C_DestroyObject, C_GetObjectSize, C_GetAttributeValue,
        C_SetAttributeValue;
    CK_RV (*C_FindObjectsInit)(CK_SESSION_HANDLE, void *, CK_ULONG);
    CK_RV (*C_FindObjects)(CK_SESSION_HANDLE, CK_OBJECT_HANDLE *, CK_ULONG, CK_ULONG *);
    ANY_FN C_FindObjectsFinal;
    CK_RV (*C_EncryptInit)(CK_SESSION_HANDLE, void *, CK_OBJECT_HANDLE);
    CK_RV (*C_Encrypt)(CK_SESSION_HANDLE, CK_BYTE *, CK_ULONG, CK_BYTE *, CK_ULONG *);
    ANY_FN C_EncryptUpdate, C_EncryptFinal;
    CK_RV (*C_DecryptInit)(CK_SESSION_HANDLE, void *, CK_OBJECT_HANDLE);
    CK_RV (*C_Decrypt)(CK_SESSION_HANDLE, CK_BYTE *, CK_ULONG, CK_BYTE *, CK_ULONG *);
    ANY_FN C_DecryptUpdate, C_DecryptFinal, C_DigestInit, C_Digest, C_DigestUpdate, C_DigestKey,
        C_DigestFinal, C_SignInit, C_Sign, C_SignUpdate, C_SignFinal, C_SignRecoverInit,
        C_SignRecover, C_VerifyInit, C_Verify, C_VerifyUpdate, C_VerifyFinal, C_VerifyRecoverInit,
        C_VerifyRecover, C_DigestEncryptUpdate, C_DecryptDigestUpdate, C_SignEncryptUpdate,
        C_DecryptVerifyUpdate, C_GenerateKey, C_GenerateKeyPair, C_WrapKey, C_UnwrapKey,
        C_DeriveKey, C_SeedRandom, C_GenerateRandom, C_GetFunctionStatus, C_CancelFunction,
        C_WaitForSlotEvent;
};

static CK_FUNCTION_LIST *real;
static CK_FUNCTION_LIST fwd;

/* $KMS_TEST_FWD_DIR/name, in a caller's buffer. */
static const char *control(char *buf, size_t len, const char *name) {
    const char *dir = getenv("KMS_TEST_FWD_DIR");
    snprintf(buf, len, "%s/%s", dir ? dir : ".", name);
    return buf;
}

static int present(const char *name) {
    char path[4096];
    return access(control(path, sizeof path, name), F_OK) == 0;
}

static void event(const char *what, CK_ULONG value) {
    char path[4096], line[128];
    int fd = open(control(path, sizeof path, "events"), O_WRONLY | O_CREAT | O_APPEND, 0600);
    if (fd < 0)
        return;
    int n = snprintf(line, sizeof line, "%s %lu\n", what, value);
    if (write(fd, line, (size_t)n) < 0) {
        /* nothing to do: the test sees a missing line */
    }
    close(fd);
}

static void sleep_ms(long ms) {
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static void maybe_hang(const char *fn) {
    if (!present("hang"))
        return;
    event(fn, 0);
    while (present("hang"))
        sleep_ms(10);
}

/* The first caller to remove logout-at-FN logs the session out, once per trigger file. */
static void maybe_logout(const char *fn, CK_SESSION_HANDLE session) {
    char name[128], path[4096];
    snprintf(name, sizeof name, "logout-at-%s", fn);
    if (unlink(control(path, sizeof path, name)) == 0)
        event("C_Logout(injected)", real->C_Logout(session));
}

static CK_RV fwd_Initialize(void *args) {
    if (present("fail-init"))
        return CKR_DEVICE_ERROR;
    return real->C_Initialize(args);
}

static CK_RV fwd_GetSlotList(CK_BBOOL token_present, CK_SLOT_ID *list, CK_ULONG *count) {
    if (token_present && present("no-token")) {
        *count = 0;
        return CKR_OK;
    }
    return real->C_GetSlotList(token_present, list, count);
}

static CK_RV fwd_GetTokenInfo(CK_SLOT_ID slot, void *info) {
    if (present("no-token"))
        return CKR_TOKEN_NOT_PRESENT;
    return real->C_GetTokenInfo(slot, info);
}

static CK_RV fwd_OpenSession(CK_SLOT_ID slot, CK_FLAGS flags, void *app, void *notify,
                             CK_SESSION_HANDLE *session) {
    if (present("no-token"))
        return CKR_TOKEN_NOT_PRESENT;
    CK_RV rv = real->C_OpenSession(slot, flags, app, notify, session);
    if (rv == CKR_OK)
        event("C_OpenSession", *session);
    return rv;
}

static CK_RV fwd_CloseSession(CK_SESSION_HANDLE session) {
    event("C_CloseSession", session);
    return real->C_CloseSession(session);
}

static CK_RV fwd_Login(CK_SESSION_HANDLE session, CK_USER_TYPE user, CK_BYTE *pin, CK_ULONG len) {
    CK_RV rv = real->C_Login(session, user, pin, len);
    event("C_Login", rv);
    return rv;
}

static CK_RV fwd_FindObjectsInit(CK_SESSION_HANDLE session, void *tmpl, CK_ULONG count) {
    maybe_logout("C_FindObjectsInit", session);
    return real->C_FindObjectsInit(session, tmpl, count);
}

static CK_RV fwd_FindObjects(CK_SESSION_HANDLE session, CK_OBJECT_HANDLE *out, CK_ULONG max,
                             CK_ULONG *count) {
    maybe_hang("hang:C_FindObjects");
    return real->C_FindObjects(session, out, max, count);
}

static CK_RV fwd_EncryptInit(CK_SESSION_HANDLE session, void *mech, CK_OBJECT_HANDLE key) {
    maybe_logout("C_EncryptInit", session);
    return real->C_EncryptInit(session, mech, key);
}

static CK_RV fwd_Encrypt(CK_SESSION_HANDLE session, CK_BYTE *in, CK_ULONG in_len, CK_BYTE *out,
                         CK_ULONG *out_len) {
    maybe_hang("hang:C_Encrypt");
    return real->C_Encrypt(session, in, in_len, out, out_len);
}

static CK_RV fwd_DecryptInit(CK_SESSION_HANDLE session, void *mech, CK_OBJECT_HANDLE key) {
    maybe_logout("C_DecryptInit", session);
    return real->C_DecryptInit(session, mech, key);
}

static CK_RV fwd_Decrypt(CK_SESSION_HANDLE session, CK_BYTE *in, CK_ULONG in_len, CK_BYTE *out,
                         CK_ULONG *out_len) {
    maybe_hang("hang:C_Decrypt");
    return real->C_Decrypt(session, in, in_len, out, out_len);
}

CK_RV C_GetFunctionList(CK_FUNCTION_LIST **out) {
    if (real == NULL) {
        const char *path = getenv("KMS_TEST_FWD_MODULE");
        void *lib = path ? dlopen(path, RTLD_NOW | RTLD_LOCAL) : NULL;
        CK_RV (*get)(CK_FUNCTION_LIST **) =
            lib ? (CK_RV(*)(CK_FUNCTION_LIST **))dlsym(lib, "C_GetFunctionList") : NULL;
        CK_FUNCTION_LIST *list = NULL;
        if (get == NULL || get(&list) != CKR_OK || list == NULL) {
            fprintf(stderr, "forward.c: cannot load the real module $KMS_TEST_FWD_MODULE=%s: %s\n",
                    path ? path : "(unset)", dlerror());
            return CKR_GENERAL_ERROR;
        }
        fwd = *list;
        fwd.C_GetFunctionList = C_GetFunctionList;
        fwd.C_Initialize = fwd_Initialize;
        fwd.C_GetSlotList = fwd_GetSlotList;
        fwd.C_GetTokenInfo = fwd_GetTokenInfo;
        fwd.C_OpenSession = fwd_OpenSession;
        fwd.C_CloseSession = fwd_CloseSession;
        fwd.C_Login = fwd_Login;
        fwd.C_FindObjectsInit = fwd_FindObjectsInit;
        fwd.C_FindObjects = fwd_FindObjects;
        fwd.C_EncryptInit = fwd_EncryptInit;
        fwd.C_Encrypt = fwd_Encrypt;
        fwd.C_DecryptInit = fwd_DecryptInit;
        fwd.C_Decrypt = fwd_Decrypt;
        real = list;
    }
    *out = &fwd;
    return CKR_OK;
}
