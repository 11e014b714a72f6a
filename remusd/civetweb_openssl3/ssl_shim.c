/* libremus-civetweb-ssl.so, SONAME "libssl.so": lets Debian 12's civetweb
 * speak TLS with Debian 12's OpenSSL 3.
 *
 * Debian's libcivetweb1 (1.15+dfsg-4) is built with OPENSSL_API_1_1 and
 * loads OpenSSL at run time: dlopen("libssl.so") and dlopen("libcrypto.so")
 * (the unversioned names of libssl-dev), then dlsym() of a list of functions
 * it requires. One of them, SSL_get_peer_certificate, is only a macro in
 * OpenSSL 3 (for SSL_get1_peer_certificate) and no exported symbol, so
 * civetweb's TLS initialisation fails, and a TLS port it was told to serve
 * crashes on the first connection.
 *
 * remusd dlopen()s this library (and its libcrypto sibling) by full path
 * before civetweb initialises TLS. glibc's dlopen matches a request by name
 * against the SONAMEs of objects already loaded, so civetweb's
 * dlopen("libssl.so") returns this library; its dlsym() lookups search this
 * library and its dependencies (libssl.so.3, libcrypto.so.3), where every
 * other function is found. The function below is the one OpenSSL 3 lacks,
 * with the same meaning (the certificate with a reference the caller frees).
 * As a side effect remusd needs only libssl3 at run time, not libssl-dev.
 * Used only with --metrics-web-config's tls_server_config (remusd/metrics.cc). */
#include <openssl/ssl.h>

#undef SSL_get_peer_certificate
X509 *SSL_get_peer_certificate(const SSL *s);
X509 *SSL_get_peer_certificate(const SSL *s) { return SSL_get1_peer_certificate(s); }
