/* libremus-civetweb-crypto.so, SONAME "libcrypto.so": civetweb's
 * dlopen("libcrypto.so") resolves to this library, whose only content is its
 * dependency on libcrypto.so.3 (every function civetweb takes from libcrypto
 * is there). See ssl_shim.c. */
int remus_civetweb_crypto_shim;
