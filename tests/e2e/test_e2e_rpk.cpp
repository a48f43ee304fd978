// End to end with raw public keys (RFC 7250): the stock gnutls-cli, allowed only raw keys, against gateway B's peer
// endpoint. A pinned key gets a CoAP answer from valve; an unpinned one is refused in the handshake and logged with
// its key id; a pin added with dauthctl lets the key in at once, and removed again refuses the next handshake and
// closes the live session.
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <catch2/catch.hpp>
#include <chrono>
#include <regex>
#include <thread>

#include "dauth/crypto/identifiers.hpp"
#include "dauth/crypto/x509.hpp"
#include "dauth/transport/transport.hpp"
#include "e2e_support.hpp"
#include "softhsm_token.hpp"

using namespace dauth;
using namespace dauth::test;
using namespace std::chrono_literals;

namespace {

constexpr const char* kClientAe = "CAE-rpkclient";

// A confirmable CoAP GET (RFC 7252 §3) for Uri-Path `path` with oneM2M-FR (option 279) = originator.
std::string coap_get(std::uint16_t message_id, const std::string& path, const std::string& originator) {
  std::string message{'\x41', '\x01', static_cast<char>(message_id >> 8), static_cast<char>(message_id & 0xff), 'T'};
  const auto option = [&](unsigned delta, const std::string& value) {
    // Deltas and lengths below 269 only (one extension byte at most).
    const auto nibble = [](unsigned n) { return n < 13 ? n : 13u; };
    message += static_cast<char>((nibble(delta) << 4) | nibble(static_cast<unsigned>(value.size())));
    if (delta >= 13) message += static_cast<char>(delta - 13);
    if (value.size() >= 13) message += static_cast<char>(value.size() - 13);
    message += value;
  };
  option(11, path);                                               // Uri-Path
  option(transport::kOptionOneM2mFrom - 11, originator);          // oneM2M-FR
  return message;
}

// gnutls-cli --udp with only raw public keys, stdin and stdout on pipes so that one session carries several
// requests and its end (the server closing it) shows as the process exiting.
class RawKeyClient {
 public:
  RawKeyClient(std::uint16_t port, const std::string& sni, const std::filesystem::path& key,
               const std::filesystem::path& public_key) {
    int in[2];
    int out[2];
    REQUIRE(::pipe2(in, O_CLOEXEC) == 0);
    REQUIRE(::pipe2(out, O_CLOEXEC) == 0);
    const std::vector<std::string> argv = {
        "gnutls-cli", "--udp", "--port", std::to_string(port), "--priority",
        // Raw public keys only, both directions (RFC 7250), as the issue asks of an independent client.
        "NORMAL:-CTYPE-ALL:+CTYPE-CLI-RAWPK:+CTYPE-SRV-RAWPK", "--rawpkkeyfile", key.string(), "--rawpkfile",
        public_key.string(), "--sni-hostname", sni,
        // The server's key is what we print with dauthctl rpk show; gnutls-cli has no raw-key pinning of its own.
        "--insecure", "--save-cert", (key.parent_path() / "server-key.pem").string(), "127.0.0.1"};
    pid_ = ::fork();
    REQUIRE(pid_ >= 0);
    if (pid_ == 0) {
      ::dup2(in[0], 0);
      ::dup2(out[1], 1);
      ::dup2(out[1], 2);
      std::vector<char*> args;
      for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
      args.push_back(nullptr);
      ::execvp(args[0], args.data());
      ::_exit(127);
    }
    ::close(in[0]);
    ::close(out[1]);
    stdin_ = in[1];
    stdout_ = out[0];
  }
  ~RawKeyClient() {
    close_input();
    if (pid_ > 0 && !exit_code_) {
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, nullptr, 0);
    }
    if (stdout_ >= 0) ::close(stdout_);
  }
  RawKeyClient(const RawKeyClient&) = delete;
  RawKeyClient& operator=(const RawKeyClient&) = delete;

  void send(const std::string& bytes) {
    REQUIRE(::write(stdin_, bytes.data(), bytes.size()) == static_cast<ssize_t>(bytes.size()));
  }
  void close_input() {
    if (stdin_ >= 0) ::close(stdin_);
    stdin_ = -1;
  }
  // Reads the client's output until it contains text, or it exits, or the limit passes.
  bool wait_for(const std::string& text, std::chrono::seconds limit = 20s) {
    const auto end = std::chrono::steady_clock::now() + limit;
    while (output_.find(text) == std::string::npos && std::chrono::steady_clock::now() < end) {
      if (!read_some(100)) break;
    }
    return output_.find(text) != std::string::npos;
  }
  // The exit status once gnutls-cli ended, nullopt if it still runs at the limit.
  std::optional<int> wait_exit(std::chrono::seconds limit = 20s) {
    const auto end = std::chrono::steady_clock::now() + limit;
    while (!exit_code_ && std::chrono::steady_clock::now() < end) {
      read_some(100);
      int status = 0;
      if (::waitpid(pid_, &status, WNOHANG) == pid_) {
        exit_code_ = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
        while (read_some(0)) {
        }
      }
    }
    return exit_code_;
  }
  const std::string& output() const { return output_; }

 private:
  // False at end of output.
  bool read_some(int timeout_ms) {
    pollfd p{stdout_, POLLIN, 0};
    if (::poll(&p, 1, timeout_ms) <= 0) return timeout_ms > 0;
    char buffer[4096];
    const ssize_t n = ::read(stdout_, buffer, sizeof buffer);
    if (n <= 0) {
      if (timeout_ms > 0) std::this_thread::sleep_for(std::chrono::milliseconds(timeout_ms));
      return false;
    }
    output_.append(buffer, static_cast<std::size_t>(n));
    return true;
  }
  pid_t pid_ = -1;
  int stdin_ = -1;
  int stdout_ = -1;
  std::string output_;
  std::optional<int> exit_code_;
};

struct KeyFiles {
  std::filesystem::path key;
  std::filesystem::path public_key;
  std::string id;  // RFC 6920, as dauthd names it
};

// A P-256 key pair for gnutls-cli, made by openssl, and its RFC 6920 id (how dauthd names it in logs and replies).
KeyFiles client_key(const std::filesystem::path& dir, const std::string& name) {
  KeyFiles files{dir / (name + ".key"), dir / (name + ".pub"), ""};
  REQUIRE(run_command({"openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out",
                       files.key.string()})
              .exit_code == 0);
  REQUIRE(run_command({"openssl", "pkey", "-in", files.key.string(), "-pubout", "-out", files.public_key.string()})
              .exit_code == 0);
  files.id = crypto::PrivateKey::load_file(files.key.string()).value().public_key_id();
  return files;
}

// certtool's "Public Key ID" line for a public key file: what a gnutls user copies.
std::string certtool_sha256(const std::filesystem::path& public_key) {
  const auto info = run_command({"certtool", "--pubkey-info", "--infile", public_key.string()});
  REQUIRE(info.exit_code == 0);
  std::smatch m;
  REQUIRE(std::regex_search(info.output, m, std::regex("sha256:[0-9a-f]{64}")));
  return m[0];
}

bool have_gnutls_tools() { return have_program("gnutls-cli") && have_program("certtool"); }

}  // namespace

TEST_CASE("gnutls-cli with raw keys only: pinned gets a CoAP answer, unpinned is refused and logged, unpinned at run "
          "time loses its session",
          "[e2e][rpk]") {
  DAUTH_E2E_SKIP_WITHOUT_STOCK_TOOLS();
  if (!transport::backend_supports_rpk() || !have_gnutls_tools()) {
    WARN("raw public keys need the GnuTLS build and gnutls-bin; skipped");
    return;
  }
  Deployment d;
  const auto pinned = client_key(d.dir(), "pinned");
  const auto stranger = client_key(d.dir(), "stranger");
  const std::string pinned_as_printed = certtool_sha256(pinned.public_key);
  d.edit_config("b", [&](std::string text) {
    text = std::regex_replace(text, std::regex("\\[peer\\]\n"), "[peer]\nraw_key = \"generate\"\n");
    return text + "\n[[peer.rpk]]\nkey = \"" + pinned_as_printed + "\"\nae_id = \"" + kClientAe +
           "\"\n\n[[peer.policy]]\npeer = \"" + kClientAe + "\"\nlocal_aes = [\"CAE-valve\"]\nmethods = [\"GET\"]\n";
  });
  d.start("mef");
  d.start_valve();
  d.start("b");
  const auto marker = put_marker(d);
  const std::uint16_t port = d.ports().at("B_PEER");
  const std::string valve_sni = crypto::server_name_for_ae_id("CAE-valve");

  // B's own key, as dauthctl rpk show prints it for pinning on the client's side.
  const auto shown = d.ctl_json("b", {"rpk", "show"});
  REQUIRE(shown["raw_keys"].size() == 1);
  CHECK(shown["raw_keys"][0]["name"] == "raw-key:peer");
  const std::string server_sha256 = shown["raw_keys"][0]["sha256"];
  CHECK(d.ctl_json("b", {"rpk", "list"})["pins"][0]["key"] == pinned.id);

  {
    RawKeyClient client(port, valve_sni, pinned.key, pinned.public_key);
    client.send(coap_get(1, "example_data", kClientAe));
    CHECK(client.wait_for(marker));
    INFO(client.output());
    // The server key gnutls-cli saw (--save-cert writes the raw key's SubjectPublicKeyInfo under a CERTIFICATE
    // label) is the one dauthctl rpk show printed, in certtool's form.
    const std::string saved = read_text_file(d.dir() / "server-key.pem");
    write_file(d.dir() / "server-key.pub",
               std::regex_replace(saved, std::regex("CERTIFICATE-----"), "PUBLIC KEY-----"));
    CHECK(certtool_sha256(d.dir() / "server-key.pub") == server_sha256);
  }

  {
    RawKeyClient client(port, valve_sni, stranger.key, stranger.public_key);
    client.send(coap_get(2, "example_data", kClientAe));
    const auto exit_code = client.wait_exit();
    INFO(client.output());
    REQUIRE(exit_code.has_value());
    CHECK(*exit_code != 0);
    CHECK(client.output().find(marker) == std::string::npos);
    CHECK(d.wait_for_log("b", stranger.id));
    const auto log = d.run_log("b");
    const auto line_start = log.rfind('\n', log.find(stranger.id)) + 1;
    const std::string line = log.substr(line_start, log.find('\n', line_start) - line_start);
    INFO(line);
    CHECK(line.find("not pinned") != std::string::npos);
    CHECK(line.find("<4>") == 0);  // a warning (sd-daemon priority prefix)
  }

  // At run time: the stranger's key pinned with dauthctl (in the pin-sha256 form) gets in at once ...
  const std::string stranger_pin = crypto::public_key_id_forms(stranger.id).pin_sha256;
  const auto added = d.ctl_json("b", {"rpk", "add", stranger_pin, kClientAe});
  CHECK(added["key"] == stranger.id);
  RawKeyClient live(port, valve_sni, stranger.key, stranger.public_key);
  live.send(coap_get(3, "example_data", kClientAe));
  {
    INFO(live.output());
    REQUIRE(live.wait_for(marker));
  }
  // ... and unpinned again, its live session is closed and its next handshake refused.
  CHECK(d.ctl("b", {"rpk", "remove", stranger.id}).exit_code == 0);
  {
    const auto ended = live.wait_exit();
    INFO(live.output());
    CHECK(ended.has_value());
  }
  CHECK(d.wait_for_log("b", "raw public key " + stranger.id + " unpinned from " + std::string(kClientAe)));
  RawKeyClient again(port, valve_sni, stranger.key, stranger.public_key);
  again.send(coap_get(4, "example_data", kClientAe));
  const auto refused = again.wait_exit();
  INFO(again.output());
  REQUIRE(refused.has_value());
  CHECK(*refused != 0);
  CHECK(again.output().find(marker) == std::string::npos);

  // A [[peer.rpk]] row removed by a reload does the same for its key.
  RawKeyClient configured(port, valve_sni, pinned.key, pinned.public_key);
  configured.send(coap_get(5, "example_data", kClientAe));
  {
    INFO(configured.output());
    REQUIRE(configured.wait_for(marker));
  }
  d.edit_config("b", [&](std::string text) {
    return std::regex_replace(text, std::regex("\\[\\[peer.rpk\\]\\]\nkey = \"[^\"]*\"\nae_id = \"[^\"]*\"\n"), "");
  });
  CHECK(d.ctl("b", {"reload"}).exit_code == 0);
  {
    const auto ended = configured.wait_exit();
    INFO(configured.output());
    CHECK(ended.has_value());
  }
  CHECK(d.wait_for_log("b", "raw public key " + pinned.id + " is no longer pinned (was " + std::string(kClientAe) +
                                ")"));
  CHECK(d.ctl_json("b", {"rpk", "list"})["pins"].empty());

  // A row a reload adds that pins a key dauthctl pinned to another AE-ID: its live session was granted the old one.
  REQUIRE(d.ctl("b", {"rpk", "add", stranger.id, kClientAe}).exit_code == 0);
  RawKeyClient repinned(port, valve_sni, stranger.key, stranger.public_key);
  repinned.send(coap_get(6, "example_data", kClientAe));
  {
    INFO(repinned.output());
    REQUIRE(repinned.wait_for(marker));
  }
  d.edit_config("b", [&](std::string text) {
    return text + "\n[[peer.rpk]]\nkey = \"" + stranger.id + "\"\nae_id = \"CAE-other\"\n";
  });
  CHECK(d.ctl("b", {"reload"}).exit_code == 0);
  {
    const auto ended = repinned.wait_exit();
    INFO(repinned.output());
    CHECK(ended.has_value());
  }
  CHECK(d.wait_for_log("b", "raw public key " + stranger.id + " is now pinned to CAE-other (was " +
                                std::string(kClientAe) + ")"));
}

TEST_CASE("dauthd to dauthd with raw keys: an AE enrols with its raw key and reaches valve with credential = rpk",
          "[e2e][rpk]") {
  DAUTH_E2E_SKIP_WITHOUT_STOCK_TOOLS();
  if (!transport::backend_supports_rpk()) {
    WARN("raw public keys need the GnuTLS build; skipped");
    return;
  }
  constexpr const char* kPump = "CAE-pump";
  Deployment d;
  d.edit_config("mef", [](std::string text) {
    return std::regex_replace(text, std::regex("\\[mef\\]\n"), "[mef]\nraw_key = \"generate\"\n");
  });
  d.edit_config("b", [&](std::string text) {
    text = std::regex_replace(text, std::regex("\\[peer\\]\n"), "[peer]\nraw_key = \"generate\"\n");
    return text + "\n[[peer.policy]]\npeer = \"" + kPump + "\"\nlocal_aes = [\"CAE-valve\"]\nmethods = [\"GET\"]\n";
  });
  d.start("mef");
  d.start_valve();
  d.start("b");
  // Keys are exchanged the way an operator would: dauthctl rpk show on one side, pinned on the other.
  const std::string mef_key = d.ctl_json("mef", {"rpk", "show"})["raw_keys"][0]["pin_sha256"];
  const std::string b_key = d.ctl_json("b", {"rpk", "show"})["raw_keys"][0]["sha256"];
  d.edit_config("a", [&](std::string text) {
    text = std::regex_replace(text, std::regex("mef_fqdn = \"mef.demo.test\"\n"),
                              "mef_fqdn = \"mef.demo.test\"\nmef_raw_keys = [\"" + mef_key + "\"]\n");
    text = std::regex_replace(text, std::regex("(ae_id = \"CAE-valve\"\naddress = \"[^\"]*\"\n)"),
                              "$1credential = \"rpk\"\n");
    return text + "\n[[enrolee.ae]]\nid = \"" + kPump + "\"\nraw_key = \"generate\"\n";
  });
  d.start("a");
  const auto a_keys = d.ctl_json("a", {"rpk", "show"})["raw_keys"];
  REQUIRE(a_keys.size() == 1);
  CHECK(a_keys[0]["name"] == kPump);
  const std::string pump_key = a_keys[0]["key"];

  // The MEF learns the pump's key at run time; the pump enrols over DTLS with raw keys on both sides.
  const auto row = d.ctl_json("mef", {"enrolees", "add", "--rpk", pump_key, "--enrolee", kPump, "--target",
                                      "CAE-valve"});
  CHECK(row["id"] == "rpk:" + pump_key);
  CHECK(row["kind"] == "rpk");
  CHECK(d.ctl("a", {"enrol", kPump, "--wait", "30"}).exit_code == 0);

  // Unpinned on either side, the peer session is refused; pinned on both, the request is answered.
  const auto marker = put_marker(d);
  CHECK(d.proxied(kPump, "get", "example_data").output.find(marker) == std::string::npos);
  CHECK(d.ctl("b", {"rpk", "add", pump_key, kPump}).exit_code == 0);
  CHECK(d.ctl("a", {"rpk", "add", b_key, "CAE-valve"}).exit_code == 0);
  const auto answered = d.proxied(kPump, "get", "example_data");
  INFO(answered.output);
  CHECK(answered.output.find(marker) != std::string::npos);
  // On B the session is the pump's, by its pinned key.
  const auto sessions = d.ctl_json("b", {"sessions"})["sessions"];
  INFO(sessions.dump());
  CHECK(std::any_of(sessions.begin(), sessions.end(), [&](const nlohmann::json& session) {
    return session["direction"] == "in" && session["peer_ae_id"] == kPump && session["kind"] == "rpk" &&
           session["identity"] == pump_key;
  }));
}

TEST_CASE("gnutls-cli with raw keys only: B's peer.raw_key in a SoftHSM token is the key it presents and signs with",
          "[e2e][rpk][pkcs11]") {
  DAUTH_E2E_SKIP_WITHOUT_STOCK_TOOLS();
  if (!transport::backend_supports_rpk() || !have_gnutls_tools()) {
    WARN("raw public keys need the GnuTLS build and gnutls-bin; skipped");
    return;
  }
  Deployment d;
  ThrowawayToken token;
  const auto server = client_key(d.dir(), "server-in-token");  // B's key: imported into the token, then deleted
  const std::string server_uri = token.import_private_key(server.key, "peer-raw-key", "11");
  std::filesystem::remove(server.key);
  const auto pin_file = d.dir() / "b" / "token.pin";
  write_file(pin_file, token.pin() + "\n", 0600);
  const auto pinned = client_key(d.dir(), "pinned");
  d.insert_config_line("b", "[daemon]", "pkcs11_pin_file = \"" + pin_file.string() + "\"");
  d.edit_config("b", [&](std::string text) {
    text = std::regex_replace(text, std::regex("\\[peer\\]\n"), "[peer]\nraw_key = \"" + server_uri + "\"\n");
    return text + "\n[[peer.rpk]]\nkey = \"" + pinned.id + "\"\nae_id = \"" + kClientAe +
           "\"\n\n[[peer.policy]]\npeer = \"" + kClientAe + "\"\nlocal_aes = [\"CAE-valve\"]\nmethods = [\"GET\"]\n";
  });
  d.start("mef");
  d.start_valve();
  d.start("b");
  const auto marker = put_marker(d);

  // dauthctl rpk show names the token key (its URI, and the id of the key imported there).
  const auto shown = d.ctl_json("b", {"rpk", "show"});
  INFO(shown.dump());
  REQUIRE(shown["raw_keys"].size() == 1);
  CHECK(shown["raw_keys"][0]["key"] == server.id);
  CHECK(shown["raw_keys"][0]["token"] == server_uri);

  // The handshake is signed in the token: gnutls-cli gets valve's answer and saw the token key.
  RawKeyClient client(d.ports().at("B_PEER"), crypto::server_name_for_ae_id("CAE-valve"), pinned.key,
                      pinned.public_key);
  client.send(coap_get(1, "example_data", kClientAe));
  INFO(client.output());
  CHECK(client.wait_for(marker));
  const std::string saved = read_text_file(d.dir() / "server-key.pem");
  write_file(d.dir() / "server-key.pub", std::regex_replace(saved, std::regex("CERTIFICATE-----"), "PUBLIC KEY-----"));
  CHECK(certtool_sha256(d.dir() / "server-key.pub") == certtool_sha256(server.public_key));
  // The key never reached B's store or logs: the store records the URI only.
  d.stop("b", SIGTERM);
  CHECK(d.run_log("b").find(token.pin()) == std::string::npos);
}
