// The one host:port parser and loopback rule (transport/include/dauth/transport/address.hpp), on its own; the
// daemon's configuration and the test relay are checked through their own paths in test_config.cpp and
// test_impair_relay.cpp.
#include <netinet/in.h>
#include <sys/socket.h>

#include <catch2/catch.hpp>

#include "dauth/transport/address.hpp"

using namespace dauth;
using transport::parse_host_port;
using transport::PortZero;

namespace {

std::string refusal(const std::string& text, PortZero port_zero = PortZero::refused) {
  auto parsed = parse_host_port(text, port_zero);
  if (parsed) return "accepted";
  CHECK(parsed.error().code == Errc::invalid_argument);
  return parsed.error().message;
}

}  // namespace

TEST_CASE("host:port takes IPv4, bracketed IPv6 and host names", "[address]") {
  auto v4 = parse_host_port("127.0.0.1:5684");
  REQUIRE(v4.ok());
  CHECK(v4->host == "127.0.0.1");
  CHECK(v4->port == 5684);
  auto v6 = parse_host_port("[::1]:5683");
  REQUIRE(v6.ok());
  CHECK(v6->host == "::1");
  CHECK(v6->port == 5683);
  auto name = parse_host_port("mef.example.net:65535");
  REQUIRE(name.ok());
  CHECK(name->host == "mef.example.net");
  CHECK(name->port == 65535);
  CHECK(parse_host_port("[fe80::1]:1")->port == 1);
}

TEST_CASE("host:port refuses IPv6 without brackets, a missing port and ports outside the range", "[address]") {
  CHECK_THAT(refusal("::1:5684"), Catch::Contains("IPv6 address needs brackets"));
  CHECK_THAT(refusal("[::1]"), Catch::Contains("brackets and a port"));
  CHECK_THAT(refusal("[::1]5684"), Catch::Contains("brackets and a port"));
  CHECK_THAT(refusal("[127.0.0.1]:5684"), Catch::Contains("only an IPv6 address goes in brackets"));
  CHECK_THAT(refusal("127.0.0.1"), Catch::StartsWith("no port") && Catch::Contains("must be host:port"));
  CHECK_THAT(refusal("127.0.0.1:"), Catch::Contains("port '': must be 1–65535"));
  CHECK_THAT(refusal(":5684"), Catch::StartsWith("no host"));
  CHECK_THAT(refusal("127.0.0.1:0"), Catch::Contains("port 0: must be 1–65535"));
  CHECK_THAT(refusal("127.0.0.1:65536"), Catch::Contains("port 65536: must be 1–65535"));
  CHECK_THAT(refusal("127.0.0.1:+80"), Catch::Contains("port '+80'"));
  CHECK_THAT(refusal("127.0.0.1:123456"), Catch::Contains("port '123456'"));
  CHECK_THAT(refusal("bad_host!:5684"), Catch::StartsWith("host: "));
  // Port 0 only where the caller binds and asks for a free port.
  CHECK(refusal("127.0.0.1:0", PortZero::allowed) == "accepted");
  CHECK(refusal("[::1]:0", PortZero::allowed) == "accepted");
  CHECK_THAT(refusal("127.0.0.1:65536", PortZero::allowed), Catch::Contains("port 65536: must be 0–65535"));
}

TEST_CASE("numeric addresses and the loopback rule", "[address]") {
  auto v4 = transport::numeric_address("127.0.0.2", 5683);
  REQUIRE(v4.ok());
  CHECK(v4->family() == AF_INET);
  CHECK(v4->length == sizeof(sockaddr_in));
  CHECK(transport::is_loopback(v4->get()));
  auto v6 = transport::numeric_address("::1", 5683);
  REQUIRE(v6.ok());
  CHECK(v6->family() == AF_INET6);
  CHECK(transport::is_loopback(v6->get()));
  CHECK_FALSE(transport::is_loopback(transport::numeric_address("10.0.0.1", 1)->get()));
  CHECK_FALSE(transport::is_loopback(transport::numeric_address("::2", 1)->get()));
  CHECK_FALSE(transport::is_loopback(transport::numeric_address("::ffff:127.0.0.1", 1)->get()));
  CHECK(transport::numeric_address("mef.example.net", 1).error().code == Errc::invalid_argument);
  CHECK_FALSE(transport::numeric_address("127.1", 1).ok());  // inet_aton's short forms are not addresses here

  CHECK(transport::is_loopback_ip("127.255.0.1"));
  CHECK(transport::is_loopback_ip("::1"));
  CHECK(transport::is_loopback_ip("0:0::1"));
  CHECK_FALSE(transport::is_loopback_ip("128.0.0.1"));
  CHECK_FALSE(transport::is_loopback_ip("localhost"));
  CHECK_FALSE(transport::is_loopback_ip("127.0.0.1:5683"));
}
