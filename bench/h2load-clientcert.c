/* h2load has no option for a client certificate. Preloaded, this gives every TLS
 * context it creates the chain and key named by H2LOAD_CERT and H2LOAD_KEY (PEM). */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>

typedef struct ssl_ctx_st SSL_CTX;
typedef struct ssl_method_st SSL_METHOD;

SSL_CTX *SSL_CTX_new(const SSL_METHOD *method) {
    static SSL_CTX *(*real_new)(const SSL_METHOD *);
    static int (*use_chain)(SSL_CTX *, const char *);
    static int (*use_key)(SSL_CTX *, const char *, int);
    if (!real_new) {
        real_new = (SSL_CTX * (*)(const SSL_METHOD *)) dlsym(RTLD_NEXT, "SSL_CTX_new");
        use_chain = (int (*)(SSL_CTX *, const char *))dlsym(RTLD_DEFAULT, "SSL_CTX_use_certificate_chain_file");
        use_key = (int (*)(SSL_CTX *, const char *, int))dlsym(RTLD_DEFAULT, "SSL_CTX_use_PrivateKey_file");
    }
    SSL_CTX *ctx = real_new(method);
    const char *cert = getenv("H2LOAD_CERT"), *key = getenv("H2LOAD_KEY");
    if (ctx && cert && key) {
        /* 1 = SSL_FILETYPE_PEM */
        if (!use_chain || use_chain(ctx, cert) != 1 || !use_key || use_key(ctx, key, 1) != 1) {
            fprintf(stderr, "clientcert.so: cannot load %s / %s\n", cert, key);
            exit(1);
        }
    }
    return ctx;
}
