# Every dependency comes from a Debian bookworm package (scripts/install-deps) and is found here, once.
find_package(PkgConfig REQUIRED)

if(DAUTH_TLS_BACKEND STREQUAL "gnutls")
  pkg_check_modules(COAP REQUIRED IMPORTED_TARGET libcoap-3-gnutls)
  pkg_check_modules(TLSBACKEND REQUIRED IMPORTED_TARGET gnutls)
elseif(DAUTH_TLS_BACKEND STREQUAL "openssl")
  pkg_check_modules(COAP REQUIRED IMPORTED_TARGET libcoap-3-openssl)
  pkg_check_modules(TLSBACKEND REQUIRED IMPORTED_TARGET openssl)
else()
  message(FATAL_ERROR "DAUTH_TLS_BACKEND=${DAUTH_TLS_BACKEND}: must be gnutls or openssl")
endif()

pkg_check_modules(SODIUM REQUIRED IMPORTED_TARGET libsodium)
# PKCS#11 keys (crypto/token.cpp): p11-kit loads the modules and parses RFC 7512 URIs.
pkg_check_modules(P11KIT REQUIRED IMPORTED_TARGET p11-kit-1)
find_package(Threads REQUIRED)
pkg_check_modules(SYSTEMD REQUIRED IMPORTED_TARGET libsystemd)

# Debian's mbedTLS 2.28 ships neither a pkg-config file nor a CMake package.
find_path(MBEDTLS_INCLUDE_DIR mbedtls/version.h REQUIRED)
find_library(MBEDX509_LIBRARY mbedx509 REQUIRED)
find_library(MBEDCRYPTO_LIBRARY mbedcrypto REQUIRED)
file(STRINGS "${MBEDTLS_INCLUDE_DIR}/mbedtls/version.h" _mbed_version REGEX "#define MBEDTLS_VERSION_STRING ")
if(NOT _mbed_version MATCHES "\"2\\.28\\.")
  message(FATAL_ERROR "mbedTLS 2.28 required, found: ${_mbed_version}")
endif()
add_library(dauth_mbedtls INTERFACE)
target_include_directories(dauth_mbedtls SYSTEM INTERFACE "${MBEDTLS_INCLUDE_DIR}")
target_link_libraries(dauth_mbedtls INTERFACE "${MBEDX509_LIBRARY}" "${MBEDCRYPTO_LIBRARY}")

find_package(tomlplusplus 3 REQUIRED)
find_package(nlohmann_json 3.11 REQUIRED)
find_package(CLI11 2 REQUIRED)
if(DAUTH_BUILD_TESTS)
  find_package(Catch2 2 REQUIRED)
endif()
