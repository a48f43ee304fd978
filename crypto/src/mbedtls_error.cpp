#include "mbedtls_error.hpp"

#include <mbedtls/asn1.h>
#include <mbedtls/base64.h>
#include <mbedtls/ctr_drbg.h>
#include <mbedtls/ecp.h>
#include <mbedtls/error.h>
#include <mbedtls/hkdf.h>
#include <mbedtls/md.h>
#include <mbedtls/pem.h>
#include <mbedtls/pk.h>
#include <mbedtls/x509.h>

#include <cstdio>
#include <string>

namespace dauth::crypto::detail {

namespace {

Errc errc_of_mbedtls(int code) {
  // mbedTLS codes are negative: a high-level part (X509, PK, PEM, ECP, MD: 0x1000-0x7F80) plus optionally a
  // low-level part (ASN1, BIGNUM, CTR_DRBG: 0x0001-0x007F) — mbedtls/error.h.
  const int high = (-code) & 0xFF80;
  const int low = (-code) & 0x007F;
  switch (-high) {
    case MBEDTLS_ERR_X509_FEATURE_UNAVAILABLE:
    case MBEDTLS_ERR_X509_UNKNOWN_SIG_ALG:
    case MBEDTLS_ERR_PK_FEATURE_UNAVAILABLE:
    case MBEDTLS_ERR_PK_UNKNOWN_PK_ALG:
    case MBEDTLS_ERR_ECP_FEATURE_UNAVAILABLE:
    case MBEDTLS_ERR_PEM_FEATURE_UNAVAILABLE:
    case MBEDTLS_ERR_PK_PASSWORD_REQUIRED:
    case MBEDTLS_ERR_PEM_PASSWORD_REQUIRED:
      return Errc::unsupported;
    case MBEDTLS_ERR_X509_UNKNOWN_OID:
    case MBEDTLS_ERR_X509_INVALID_FORMAT:
    case MBEDTLS_ERR_X509_INVALID_VERSION:
    case MBEDTLS_ERR_X509_INVALID_SERIAL:
    case MBEDTLS_ERR_X509_INVALID_ALG:
    case MBEDTLS_ERR_X509_INVALID_NAME:
    case MBEDTLS_ERR_X509_INVALID_DATE:
    case MBEDTLS_ERR_X509_INVALID_SIGNATURE:
    case MBEDTLS_ERR_X509_INVALID_EXTENSIONS:
    case MBEDTLS_ERR_X509_UNKNOWN_VERSION:
    case MBEDTLS_ERR_X509_SIG_MISMATCH:
    case MBEDTLS_ERR_PK_KEY_INVALID_FORMAT:
    case MBEDTLS_ERR_PK_KEY_INVALID_VERSION:
    case MBEDTLS_ERR_PK_INVALID_PUBKEY:
    case MBEDTLS_ERR_PK_INVALID_ALG:
    case MBEDTLS_ERR_PEM_NO_HEADER_FOOTER_PRESENT:
    case MBEDTLS_ERR_PEM_INVALID_DATA:
    case MBEDTLS_ERR_PEM_INVALID_ENC_IV:
    case MBEDTLS_ERR_PEM_UNKNOWN_ENC_ALG:
      return Errc::parse;
    case MBEDTLS_ERR_X509_CERT_VERIFY_FAILED:
      return Errc::unauthenticated;
    case MBEDTLS_ERR_X509_FATAL_ERROR:
      return Errc::internal;
    case MBEDTLS_ERR_X509_BAD_INPUT_DATA:
    case MBEDTLS_ERR_PK_BAD_INPUT_DATA:
    case MBEDTLS_ERR_PK_TYPE_MISMATCH:
    case MBEDTLS_ERR_ECP_BAD_INPUT_DATA:
    case MBEDTLS_ERR_PEM_BAD_INPUT_DATA:
    case MBEDTLS_ERR_MD_BAD_INPUT_DATA:
    case MBEDTLS_ERR_HKDF_BAD_INPUT_DATA:
      return Errc::invalid_argument;
    case MBEDTLS_ERR_X509_FILE_IO_ERROR:
    case MBEDTLS_ERR_PK_FILE_IO_ERROR:
    case MBEDTLS_ERR_MD_FILE_IO_ERROR:
      return Errc::io;
    case MBEDTLS_ERR_ECP_VERIFY_FAILED:
    case MBEDTLS_ERR_ECP_SIG_LEN_MISMATCH:
    case MBEDTLS_ERR_PK_SIG_LEN_MISMATCH:
    case MBEDTLS_ERR_ECP_INVALID_KEY:
    case MBEDTLS_ERR_ECP_RANDOM_FAILED:
      return Errc::crypto;
    case MBEDTLS_ERR_X509_ALLOC_FAILED:
    case MBEDTLS_ERR_PK_ALLOC_FAILED:
    case MBEDTLS_ERR_ECP_ALLOC_FAILED:
    case MBEDTLS_ERR_PEM_ALLOC_FAILED:
    case MBEDTLS_ERR_MD_ALLOC_FAILED:
      return Errc::limit;
    case MBEDTLS_ERR_X509_BUFFER_TOO_SMALL:
    case MBEDTLS_ERR_ECP_BUFFER_TOO_SMALL:
      return Errc::internal;
    default:
      break;
  }
  switch (-low) {
    case MBEDTLS_ERR_ASN1_OUT_OF_DATA:
    case MBEDTLS_ERR_ASN1_UNEXPECTED_TAG:
    case MBEDTLS_ERR_ASN1_INVALID_LENGTH:
    case MBEDTLS_ERR_ASN1_LENGTH_MISMATCH:
    case MBEDTLS_ERR_ASN1_INVALID_DATA:
    case MBEDTLS_ERR_BASE64_INVALID_CHARACTER:
      return Errc::parse;
    case MBEDTLS_ERR_ASN1_ALLOC_FAILED:
    case MBEDTLS_ERR_MPI_ALLOC_FAILED:
      return Errc::limit;
    case MBEDTLS_ERR_CTR_DRBG_ENTROPY_SOURCE_FAILED:
    case MBEDTLS_ERR_CTR_DRBG_REQUEST_TOO_BIG:
    case MBEDTLS_ERR_CTR_DRBG_INPUT_TOO_BIG:
      return Errc::crypto;
    default:
      return Errc::internal;
  }
}

}  // namespace

Error mbedtls_error(int code, std::string_view what) {
  char text[200];
  mbedtls_strerror(code, text, sizeof text);
  char hex[16];
  std::snprintf(hex, sizeof hex, "-0x%04X", static_cast<unsigned>(-code));
  std::string message(what);
  message += ": mbedTLS ";
  message += hex;
  message += " (";
  message += text;
  message += ")";
  return make_error(errc_of_mbedtls(code), std::move(message));
}

}  // namespace dauth::crypto::detail
