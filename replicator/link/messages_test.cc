#include "replicator/link/messages.h"

#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include <string>
#include <vector>

namespace remus::wire {
namespace {

using nlohmann::json;

ConfigMsg FullConfig() {
  ConfigMsg m;
  m.domain = "web1";
  m.argv = {"qemu-system-x86_64", "-m", "512", "-drive", "file=/img/a.qcow2,id=drive0"};
  m.qemu_version = "7.2.0";
  m.qemu_package = "Debian 1:7.2+dfsg-7";
  m.accelerator = "kvm";
  m.interval_ms = 100;
  m.disks = {{"drive0", "n0", "qcow2", "/img/a.qcow2", 1073741824},
             {"vdb", "libvirt-1-format", "raw", "/img/b.raw", 4096}};
  m.heartbeat_interval_ms = 200;
  m.heartbeat_timeout_ms = 3000;
  m.libvirt = LibvirtConfig{"<domain type='kvm'><name>web1</name></domain>", "web1", "qemu:///system"};
  return m;
}

TEST(Messages, ConfigRoundTrip) {
  ConfigMsg m = FullConfig();
  auto back = DecodeConfig(EncodeConfig(m));
  ASSERT_TRUE(back.ok()) << back.status().ToString();
  EXPECT_EQ(*back, m);

  // A QMP-mode config: no libvirt, no disks, no heartbeat.
  ConfigMsg q;
  q.argv = {"qemu"};
  back = DecodeConfig(EncodeConfig(q));
  ASSERT_TRUE(back.ok()) << back.status().ToString();
  EXPECT_EQ(*back, q);

  // libvirt mode needs no argv.
  ConfigMsg l;
  l.libvirt = LibvirtConfig{"<domain/>", "", ""};
  back = DecodeConfig(EncodeConfig(l));
  ASSERT_TRUE(back.ok()) << back.status().ToString();
  EXPECT_EQ(*back, l);
}

TEST(Messages, SyncBeginRoundTrip) {
  SyncBeginMsg m;
  m.blocks = {{"pc.ram", 16u << 20}, {"/rom@etc/acpi/tables", 131072}, {std::string(255, 'x'), 0}};
  m.configuration = std::string("\x07\x00\x00\x00\x03" "abc\xff\x00", 10);
  m.total_bytes = (16u << 20) + 131072;
  auto back = DecodeSyncBegin(EncodeSyncBegin(m));
  ASSERT_TRUE(back.ok()) << back.status().ToString();
  EXPECT_EQ(*back, m);
}

TEST(Messages, ReasonRoundTrip) {
  for (const std::string& r : std::vector<std::string>{"", "QEMU exited", "unprotected by the operator \xe2\x9c\x93", "a \"quoted\"\n line"}) {
    auto back = DecodeReason(EncodeReason({r}));
    ASSERT_TRUE(back.ok()) << back.status().ToString();
    EXPECT_EQ(back->reason, r);
  }
  // Older peers sent no payload.
  auto empty = DecodeReason("");
  ASSERT_TRUE(empty.ok());
  EXPECT_EQ(empty->reason, "");
  auto no_field = DecodeReason("{}");
  ASSERT_TRUE(no_field.ok());
  EXPECT_EQ(no_field->reason, "");
}

TEST(Messages, SwitchoverRoundTripAndBounds) {
  SwitchoverMsg m{"planned switchover", "10.0.0.1:7788", 100, "nfqueue"};
  auto d = DecodeSwitchover(EncodeSwitchover(m));
  ASSERT_TRUE(d.ok()) << d.status().ToString();
  EXPECT_EQ(*d, m);
  EXPECT_EQ(*DecodeSwitchover(""), SwitchoverMsg{});
  EXPECT_EQ(DecodeSwitchover(R"({"reprotect_to":5})").status().code(), Code::kInvalidArgument);
  EXPECT_EQ(DecodeSwitchover(R"({"interval_ms":-1})").status().code(), Code::kInvalidArgument);
  EXPECT_EQ(DecodeSwitchover(R"({"netbuf":"tc"})").status().code(), Code::kInvalidArgument);
  EXPECT_EQ(DecodeSwitchover(R"({"reprotect_to":")" + std::string(400, 'a') + R"("})").status().code(),
            Code::kInvalidArgument);
  EXPECT_EQ(DecodeSwitchover("{").status().code(), Code::kDataLoss);
}

TEST(Messages, EncodersNeverThrowOnInvalidUtf8) {
  std::string out;
  ASSERT_NO_THROW(out = EncodeReason({"bad \xff byte"}));
  auto back = DecodeReason(out);
  ASSERT_TRUE(back.ok()) << back.status().ToString();
  EXPECT_EQ(back->reason, "bad \xef\xbf\xbd byte");  // U+FFFD
  ConfigMsg m;
  m.argv = {"qemu", "-drive", "file=/img/\xc3("};
  ASSERT_NO_THROW(out = EncodeConfig(m));
  EXPECT_TRUE(DecodeConfig(out).ok());
}

// The exact bytes primary.cc sent before the codecs existed (nlohmann sorts
// object keys). Pinned by hand so a change in the encoder shows up here.
TEST(Messages, ConfigGoldenMatchesTheOldPrimary) {
  const std::string golden =
      R"({"accelerator":"kvm","argv":["qemu-system-x86_64","-m","512","-drive","file=/img/a.qcow2,id=drive0"],)"
      R"("disks":[{"file":"/img/a.qcow2","format":"qcow2","id":"drive0","node":"n0","size":1073741824},)"
      R"({"file":"/img/b.raw","format":"raw","id":"vdb","node":"libvirt-1-format","size":4096}],)"
      R"("domain":"web1","heartbeat_interval_ms":200,"heartbeat_timeout_ms":3000,"interval_ms":100,)"
      R"("libvirt":{"name":"web1","uri":"qemu:///system","xml":"<domain type='kvm'><name>web1</name></domain>"},)"
      R"("qemu_package":"Debian 1:7.2+dfsg-7","qemu_version":"7.2.0"})";
  ConfigMsg m = FullConfig();
  EXPECT_EQ(EncodeConfig(m), golden);

  // The same, built the way primary.cc's Connect built it.
  json disks_json = json::array();
  for (const auto& d : m.disks)
    disks_json.push_back({{"id", d.id}, {"node", d.node}, {"format", d.format}, {"file", d.file}, {"size", d.size}});
  int interval_ms = 100;
  int64_t hb_interval = 200, hb_timeout = 3000;
  json config = {{"domain", m.domain},
                 {"argv", m.argv},
                 {"qemu_version", m.qemu_version},
                 {"qemu_package", m.qemu_package},
                 {"accelerator", m.accelerator},
                 {"interval_ms", interval_ms},
                 {"disks", disks_json},
                 {"heartbeat_interval_ms", hb_interval},
                 {"heartbeat_timeout_ms", hb_timeout}};
  config["libvirt"] = {{"xml", m.libvirt->xml}, {"name", m.libvirt->name}, {"uri", m.libvirt->uri}};
  EXPECT_EQ(config.dump(), golden);

  auto back = DecodeConfig(golden);
  ASSERT_TRUE(back.ok()) << back.status().ToString();
  EXPECT_EQ(*back, m);
}

TEST(Messages, SyncBeginAndReasonGoldens) {
  const std::string golden =
      R"({"blocks":[{"id":"pc.ram","used_length":16777216},{"id":"vga.vram","used_length":8388608}],)"
      R"("configuration":"0700000003616263","total_bytes":25165824})";
  SyncBeginMsg m{{{"pc.ram", 16777216}, {"vga.vram", 8388608}}, std::string("\x07\x00\x00\x00\x03" "abc", 8),
                 25165824};
  EXPECT_EQ(EncodeSyncBegin(m), golden);
  auto back = DecodeSyncBegin(golden);
  ASSERT_TRUE(back.ok()) << back.status().ToString();
  EXPECT_EQ(*back, m);

  EXPECT_EQ(EncodeReason({"QEMU exited"}), R"({"reason":"QEMU exited"})");
  EXPECT_EQ(EncodeReason({"QEMU exited"}), json({{"reason", "QEMU exited"}}).dump());
}

// What the backup's tests and older primaries send: fields missing take
// their defaults, unknown fields are ignored.
TEST(Messages, MinimalAndForwardCompatiblePayloads) {
  auto c = DecodeConfig(R"({"argv":["qemu"]})");
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  EXPECT_EQ(c->argv, std::vector<std::string>{"qemu"});
  EXPECT_EQ(c->heartbeat_interval_ms, 0);
  EXPECT_FALSE(c->libvirt.has_value());

  c = DecodeConfig(R"({"argv":["q"],"future":{"x":[1,2,{"y":null}]},"disks":[{"id":"d0","size":0,"extra":1}]})");
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  ASSERT_EQ(c->disks.size(), 1u);
  EXPECT_EQ(c->disks[0], (DiskSpec{"d0", "", "", "", 0}));

  auto s = DecodeSyncBegin("{}");
  ASSERT_TRUE(s.ok()) << s.status().ToString();
  EXPECT_TRUE(s->blocks.empty());
  EXPECT_EQ(s->total_bytes, 0u);

  auto r = DecodeReason(R"({"reason":"x","code":3})");
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->reason, "x");
}

// The re-protection policy and the options it reuses (2026-12).
TEST(Messages, ConfigReprotection) {
  ConfigMsg m;
  m.argv = {"qemu"};
  m.reprotect_to = "10.0.0.1:7788";
  m.netbuf = "nfqueue";
  m.compress = true;
  m.page_delta = "xor";
  m.disks_option = "vda,vdb";
  m.residency = "paged";
  m.interval_mode = "auto";
  m.latency_budget_ms = 250;
  m.interval_min_ms = 20;
  m.interval_max_ms = 2000;
  auto back = DecodeConfig(EncodeConfig(m));
  ASSERT_TRUE(back.ok()) << back.status().ToString();
  EXPECT_EQ(*back, m);
  // An older primary's CONFIG: no policy.
  back = DecodeConfig(R"({"argv":["qemu"]})");
  ASSERT_TRUE(back.ok());
  EXPECT_TRUE(back->reprotect_to.empty() && back->netbuf.empty() && !back->compress && back->disks_option.empty() &&
              back->residency.empty() && back->page_delta.empty() && back->interval_mode.empty() &&
              back->latency_budget_ms == 0);
  EXPECT_EQ(CompressionName(false, false), "none");
  EXPECT_EQ(CompressionName(true, false), "lz4");
  EXPECT_EQ(CompressionName(true, true), "xor-lz4");
  for (const char* bad : {R"({"argv":["q"],"reprotect_to":"host:99999"})", R"({"argv":["q"],"reprotect_to":7})",
                          R"({"argv":["q"],"netbuf":"tc"})", R"({"argv":["q"],"compress":"yes"})",
                          R"({"argv":["q"],"disks_option":"a b"})", R"({"argv":["q"],"residency":"warm"})",
                          R"({"argv":["q"],"compress":true,"page_delta":"rle"})",
                          R"({"argv":["q"],"page_delta":"xor"})", R"({"argv":["q"],"interval_mode":"fast"})",
                          R"({"argv":["q"],"latency_budget_ms":-1})", R"({"argv":["q"],"interval_max_ms":600001})"}) {
    auto r = DecodeConfig(bad);
    EXPECT_EQ(r.status().code(), Code::kInvalidArgument) << bad;
  }
  EXPECT_FALSE(DecodeConfig(R"({"argv":["q"],"reprotect_to":")" + std::string(256, 'h') + R"("})").ok());
}

TEST(Messages, Bounds) {
  // Exactly at the limits: accepted.
  ConfigMsg m;
  m.argv.assign(kMaxConfigArgs, "a");
  for (size_t i = 0; i < kMaxConfigDisks; i++) m.disks.push_back({"d" + std::to_string(i), "", "", "", i});
  m.interval_ms = 600000;
  m.heartbeat_interval_ms = 599999;
  m.heartbeat_timeout_ms = 600000;
  m.libvirt = LibvirtConfig{std::string(kMaxLibvirtXml, 'x'), "", ""};
  auto back = DecodeConfig(EncodeConfig(m));
  ASSERT_TRUE(back.ok()) << back.status().ToString();
  EXPECT_EQ(*back, m);

  SyncBeginMsg s;
  s.blocks.assign(kMaxSyncBlocks, {"b", 4096});
  auto sb = DecodeSyncBegin(EncodeSyncBegin(s));
  ASSERT_TRUE(sb.ok()) << sb.status().ToString();
  EXPECT_EQ(*sb, s);

  // One beyond: refused, naming the field.
  m.argv.push_back("a");
  auto over = DecodeConfig(EncodeConfig(m));
  EXPECT_EQ(over.status().code(), Code::kInvalidArgument);
  EXPECT_NE(over.status().message().find("argv has 4097"), std::string::npos) << over.status().message();
  m.argv.pop_back();
  m.disks.push_back({"d64", "", "", "", 0});
  over = DecodeConfig(EncodeConfig(m));
  EXPECT_EQ(over.status().code(), Code::kInvalidArgument);
  EXPECT_NE(over.status().message().find("disks has 65"), std::string::npos) << over.status().message();
  m.disks.pop_back();
  m.libvirt->xml.push_back('x');
  over = DecodeConfig(EncodeConfig(m));
  EXPECT_EQ(over.status().code(), Code::kInvalidArgument);
  EXPECT_NE(over.status().message().find("libvirt.xml is 16777217 bytes"), std::string::npos)
      << over.status().message();
  s.blocks.push_back({"b", 4096});
  auto sover = DecodeSyncBegin(EncodeSyncBegin(s));
  EXPECT_EQ(sover.status().code(), Code::kInvalidArgument);
  EXPECT_NE(sover.status().message().find("blocks has 1025"), std::string::npos) << sover.status().message();
}

TEST(Messages, DiskIds) {
  for (const std::string& ok : std::vector<std::string>{"drive0", "vda", "a", "A.b-c_d", "0disk", std::string(64, 'x')})
    EXPECT_TRUE(ValidName(ok)) << ok;
  for (const std::string& bad : std::vector<std::string>{"", ".hidden", "-x", "..", "a/b", "a b", "x\xc3\xa9", std::string(65, 'x'),
                          std::string("a\0b", 3), "../etc"})
    EXPECT_FALSE(ValidName(bad)) << bad;
  auto c = DecodeConfig(R"({"argv":["q"],"disks":[{"id":"../x","size":1}]})");
  EXPECT_EQ(c.status().code(), Code::kInvalidArgument);
  EXPECT_NE(c.status().message().find("CONFIG: disks[0].id '../x' is not a usable name"), std::string::npos)
      << c.status().message();
  c = DecodeConfig(R"({"argv":["q"],"disks":[{"id":"a","size":1},{"id":"a","size":2}]})");
  EXPECT_EQ(c.status().code(), Code::kInvalidArgument);
  EXPECT_NE(c.status().message().find("'a' twice"), std::string::npos) << c.status().message();

  auto d = DiskSpecFromJson(json{{"id", "vda"}, {"size", -1}});
  EXPECT_EQ(d.status().code(), Code::kInvalidArgument);
  EXPECT_EQ(d.status().message(), "disk: size is not an unsigned integer");
  d = DiskSpecFromJson(json::array());
  EXPECT_EQ(d.status().code(), Code::kInvalidArgument);
  EXPECT_EQ(DiskSpecToJson({"vda", "n", "raw", "/f", 7}).dump(),
            R"({"file":"/f","format":"raw","id":"vda","node":"n","size":7})");
}

TEST(Messages, Heartbeats) {
  struct Case {
    const char* fields;
    bool ok;
  };
  const Case cases[] = {
      {"", true},
      {R"(,"heartbeat_interval_ms":0,"heartbeat_timeout_ms":0)", true},
      {R"(,"heartbeat_interval_ms":1,"heartbeat_timeout_ms":2)", true},
      {R"(,"heartbeat_interval_ms":100,"heartbeat_timeout_ms":600000)", true},
      {R"(,"heartbeat_interval_ms":100)", false},
      {R"(,"heartbeat_timeout_ms":100)", false},
      {R"(,"heartbeat_interval_ms":0,"heartbeat_timeout_ms":100)", false},
      {R"(,"heartbeat_interval_ms":100,"heartbeat_timeout_ms":0)", false},
      {R"(,"heartbeat_interval_ms":100,"heartbeat_timeout_ms":100)", false},
      {R"(,"heartbeat_interval_ms":200,"heartbeat_timeout_ms":100)", false},
      {R"(,"heartbeat_interval_ms":100,"heartbeat_timeout_ms":600001)", false},
      {R"(,"heartbeat_interval_ms":-1,"heartbeat_timeout_ms":100)", false},
      {R"(,"heartbeat_interval_ms":100,"heartbeat_timeout_ms":18446744073709551615)", false},
      {R"(,"heartbeat_interval_ms":100,"heartbeat_timeout_ms":-9223372036854775808)", false},
  };
  for (const auto& c : cases) {
    std::string payload = std::string(R"({"argv":["q"])") + c.fields + "}";
    auto m = DecodeConfig(payload);
    if (c.ok) {
      EXPECT_TRUE(m.ok()) << payload << ": " << m.status().ToString();
    } else {
      EXPECT_EQ(m.status().code(), Code::kInvalidArgument) << payload;
      EXPECT_NE(m.status().message().find("heartbeat_"), std::string::npos) << m.status().message();
    }
  }
}

// ---- Hostile payloads ---------------------------------------------------------

enum class Msg { kConfig, kSyncBegin, kReason };

Status Decode(Msg which, std::string_view payload) {
  switch (which) {
    case Msg::kConfig: return DecodeConfig(payload).status();
    case Msg::kSyncBegin: return DecodeSyncBegin(payload).status();
    case Msg::kReason: return DecodeReason(payload).status();
  }
  return OkStatus();
}

// Decodes without letting an exception escape (it would fail the test, not
// crash it).
Status DecodeNoThrow(Msg which, std::string_view payload) {
  Status s = OkStatus();
  EXPECT_NO_THROW(s = Decode(which, payload)) << payload.substr(0, 200);
  return s;
}

enum class Type { kString, kUint, kInt, kArray, kObject };

bool Fits(const json& v, Type t) {
  switch (t) {
    case Type::kString: return v.is_string();
    case Type::kUint: return v.is_number_unsigned();
    case Type::kInt: return v.is_number_integer();
    case Type::kArray: return v.is_array();
    case Type::kObject: return v.is_object();
  }
  return false;
}

// A valid payload of each message, as JSON to mutate.
json ValidJson(Msg which) {
  switch (which) {
    case Msg::kConfig: return json::parse(EncodeConfig(FullConfig()));
    case Msg::kSyncBegin:
      return json::parse(EncodeSyncBegin({{{"pc.ram", 4096}}, "\x07", 4096}));
    case Msg::kReason: return json{{"reason", "x"}};
  }
  return {};
}

// Every field, set to every JSON type but its own: InvalidArgument naming the field.
TEST(MessagesHostile, EveryFieldWithEveryWrongType) {
  struct Field {
    Msg msg;
    json::json_pointer ptr;
    Type type;
    std::string name;  // as the message names it
  };
  const Field fields[] = {
      {Msg::kConfig, json::json_pointer("/domain"), Type::kString, "domain"},
      {Msg::kConfig, json::json_pointer("/argv"), Type::kArray, "argv"},
      {Msg::kConfig, json::json_pointer("/argv/1"), Type::kString, "argv[1]"},
      {Msg::kConfig, json::json_pointer("/qemu_version"), Type::kString, "qemu_version"},
      {Msg::kConfig, json::json_pointer("/qemu_package"), Type::kString, "qemu_package"},
      {Msg::kConfig, json::json_pointer("/accelerator"), Type::kString, "accelerator"},
      {Msg::kConfig, json::json_pointer("/interval_ms"), Type::kInt, "interval_ms"},
      {Msg::kConfig, json::json_pointer("/disks"), Type::kArray, "disks"},
      {Msg::kConfig, json::json_pointer("/disks/1"), Type::kObject, "disks[1]"},
      {Msg::kConfig, json::json_pointer("/disks/0/id"), Type::kString, "disks[0].id"},
      {Msg::kConfig, json::json_pointer("/disks/0/node"), Type::kString, "disks[0].node"},
      {Msg::kConfig, json::json_pointer("/disks/0/format"), Type::kString, "disks[0].format"},
      {Msg::kConfig, json::json_pointer("/disks/1/file"), Type::kString, "disks[1].file"},
      {Msg::kConfig, json::json_pointer("/disks/1/size"), Type::kUint, "disks[1].size"},
      {Msg::kConfig, json::json_pointer("/heartbeat_interval_ms"), Type::kInt, "heartbeat_interval_ms"},
      {Msg::kConfig, json::json_pointer("/heartbeat_timeout_ms"), Type::kInt, "heartbeat_timeout_ms"},
      {Msg::kConfig, json::json_pointer("/libvirt"), Type::kObject, "libvirt"},
      {Msg::kConfig, json::json_pointer("/libvirt/xml"), Type::kString, "libvirt.xml"},
      {Msg::kConfig, json::json_pointer("/libvirt/name"), Type::kString, "libvirt.name"},
      {Msg::kConfig, json::json_pointer("/libvirt/uri"), Type::kString, "libvirt.uri"},
      {Msg::kSyncBegin, json::json_pointer("/blocks"), Type::kArray, "blocks"},
      {Msg::kSyncBegin, json::json_pointer("/blocks/0"), Type::kObject, "blocks[0]"},
      {Msg::kSyncBegin, json::json_pointer("/blocks/0/id"), Type::kString, "blocks[0].id"},
      {Msg::kSyncBegin, json::json_pointer("/blocks/0/used_length"), Type::kUint, "blocks[0].used_length"},
      {Msg::kSyncBegin, json::json_pointer("/configuration"), Type::kString, "configuration"},
      {Msg::kSyncBegin, json::json_pointer("/total_bytes"), Type::kUint, "total_bytes"},
      {Msg::kReason, json::json_pointer("/reason"), Type::kString, "reason"},
  };
  const json values[] = {nullptr, true, false, 0, 7, -7, 1.5, -0.0, 1e300, "", "x", "7",
                         json::array(), json::array({1, "a"}), json::object(), json{{"a", {1, 2}}}};
  int checked = 0;
  for (const auto& f : fields) {
    for (const auto& v : values) {
      if (Fits(json::parse(v.dump()), f.type)) continue;  // as the decoder will see it: 7 is unsigned
      json j = ValidJson(f.msg);
      j[f.ptr] = v;
      std::string payload = j.dump();
      Status s = DecodeNoThrow(f.msg, payload);
      EXPECT_EQ(s.code(), Code::kInvalidArgument) << payload << " -> " << s.ToString();
      EXPECT_NE(s.message().find(f.name + " "), std::string::npos) << payload << " -> " << s.message();
      checked++;
    }
  }
  EXPECT_GT(checked, 300);
}

TEST(MessagesHostile, Table) {
  struct Case {
    const char* name;
    Msg msg;
    std::string payload;
    Code code;
    std::string needle;  // in the message
  };
  const std::string deep_open(10000, '[');
  const std::string deep_valid = deep_open + std::string(10000, ']');
  std::string many_args = R"({"argv":[)";
  for (int i = 0; i < 100000; i++) many_args += i ? ",\"a\"" : "\"a\"";
  many_args += "]}";
  std::string many_blocks = R"({"blocks":[)";
  for (int i = 0; i < 5000; i++) many_blocks += i ? ",1" : "1";
  many_blocks += "]}";
  const Case cases[] = {
      // Not JSON at all: DataLoss.
      {"config empty", Msg::kConfig, "", Code::kDataLoss, "CONFIG is not JSON"},
      {"config garbage", Msg::kConfig, "hello", Code::kDataLoss, "CONFIG is not JSON"},
      {"config trailing", Msg::kConfig, R"({"argv":["q"]} x)", Code::kDataLoss, "not JSON"},
      {"config two docs", Msg::kConfig, R"({"argv":["q"]}{})", Code::kDataLoss, "not JSON"},
      {"config nul", Msg::kConfig, std::string("{\"argv\":[\"q\0\"]}", 14), Code::kDataLoss, "not JSON"},
      {"config non-utf8", Msg::kConfig, "{\"argv\":[\"q\xff\"]}", Code::kDataLoss, "not JSON"},
      {"config overlong utf8", Msg::kConfig, "{\"argv\":[\"\xc0\xaf\"]}", Code::kDataLoss, "not JSON"},
      {"config lone surrogate", Msg::kConfig, R"({"argv":["\ud800"]})", Code::kDataLoss, "not JSON"},
      {"config deep open", Msg::kConfig, deep_open, Code::kDataLoss, "not JSON"},
      {"config number overflow", Msg::kConfig, R"({"argv":["q"],"interval_ms":1e400})", Code::kDataLoss,
       "not JSON"},
      {"config comment", Msg::kConfig, R"({"argv":["q"] /* x */})", Code::kDataLoss, "not JSON"},
      {"sync garbage", Msg::kSyncBegin, "{", Code::kDataLoss, "SYNC_BEGIN is not JSON"},
      {"reason garbage", Msg::kReason, "QEMU exited", Code::kDataLoss, "FAILOVER/GOODBYE is not JSON"},
      // JSON, wrong shape.
      {"config deep valid", Msg::kConfig, deep_valid, Code::kInvalidArgument, "CONFIG is not a JSON object"},
      {"config array", Msg::kConfig, "[]", Code::kInvalidArgument, "not a JSON object"},
      {"config null", Msg::kConfig, "null", Code::kInvalidArgument, "not a JSON object"},
      {"config string", Msg::kConfig, R"("argv")", Code::kInvalidArgument, "not a JSON object"},
      {"config no argv", Msg::kConfig, "{}", Code::kInvalidArgument, "carries no QEMU argv"},
      {"config empty argv", Msg::kConfig, R"({"argv":[]})", Code::kInvalidArgument, "carries no QEMU argv"},
      {"config deep argv", Msg::kConfig, R"({"argv":[)" + deep_valid + "]}", Code::kInvalidArgument,
       "argv[0] is not a string"},
      {"config deep unknown field", Msg::kConfig, R"({"argv":["q"],"x":)" + deep_valid + "}", Code::kOk, ""},
      {"config huge argv", Msg::kConfig, many_args, Code::kInvalidArgument, "argv has 100000 elements"},
      {"config libvirt without xml", Msg::kConfig, R"({"libvirt":{"name":"web1"}})", Code::kInvalidArgument,
       "libvirt.xml is missing"},
      {"config disk without id", Msg::kConfig, R"({"argv":["q"],"disks":[{"size":1}]})",
       Code::kInvalidArgument, "disks[0].id is missing"},
      {"config disk without size", Msg::kConfig, R"({"argv":["q"],"disks":[{"id":"a"}]})",
       Code::kInvalidArgument, "disks[0].size is missing"},
      {"config disk nested garbage", Msg::kConfig, R"({"argv":["q"],"disks":[[{"id":"a","size":1}]]})",
       Code::kInvalidArgument, "disks[0] is not an object"},
      {"config disk empty id", Msg::kConfig, R"({"argv":["q"],"disks":[{"id":"","size":1}]})",
       Code::kInvalidArgument, "disks[0].id '' is not a usable name"},
      {"config interval negative", Msg::kConfig, R"({"argv":["q"],"interval_ms":-1})", Code::kInvalidArgument,
       "interval_ms is out of range"},
      {"config interval huge", Msg::kConfig, R"({"argv":["q"],"interval_ms":600001})", Code::kInvalidArgument,
       "interval_ms is out of range (0..600000)"},
      {"config interval float", Msg::kConfig, R"({"argv":["q"],"interval_ms":100.0})", Code::kInvalidArgument,
       "interval_ms is not an integer"},
      {"config heartbeat string", Msg::kConfig, R"({"argv":["q"],"heartbeat_timeout_ms":"x"})",
       Code::kInvalidArgument, "CONFIG: heartbeat_timeout_ms is not an integer"},
      {"sync blocks number", Msg::kSyncBegin, R"({"blocks":5})", Code::kInvalidArgument,
       "SYNC_BEGIN: blocks is not an array"},
      {"sync huge blocks", Msg::kSyncBegin, many_blocks, Code::kInvalidArgument, "blocks has 5000 entries"},
      {"sync block null", Msg::kSyncBegin, R"({"blocks":[null]})", Code::kInvalidArgument,
       "blocks[0] is not an object"},
      {"sync block no id", Msg::kSyncBegin, R"({"blocks":[{"used_length":1}]})", Code::kInvalidArgument,
       "blocks[0].id is missing"},
      {"sync block empty id", Msg::kSyncBegin, R"({"blocks":[{"id":"","used_length":1}]})",
       Code::kInvalidArgument, "blocks[0].id is empty"},
      {"sync block long id", Msg::kSyncBegin,
       R"({"blocks":[{"id":")" + std::string(256, 'r') + R"(","used_length":1}]})", Code::kInvalidArgument,
       "blocks[0].id is 256 bytes"},
      {"sync block no length", Msg::kSyncBegin, R"({"blocks":[{"id":"pc.ram"}]})", Code::kInvalidArgument,
       "blocks[0].used_length is missing"},
      {"sync block negative length", Msg::kSyncBegin, R"({"blocks":[{"id":"pc.ram","used_length":-4096}]})",
       Code::kInvalidArgument, "used_length is not an unsigned integer"},
      {"sync config odd hex", Msg::kSyncBegin, R"({"configuration":"abc"})", Code::kInvalidArgument,
       "configuration is not hex"},
      {"sync config not hex", Msg::kSyncBegin, R"({"configuration":"zz"})", Code::kInvalidArgument,
       "configuration is not hex"},
      {"sync total negative", Msg::kSyncBegin, R"({"total_bytes":-1})", Code::kInvalidArgument,
       "total_bytes is not an unsigned integer"},
      {"sync total too big", Msg::kSyncBegin, R"({"total_bytes":18446744073709551616})", Code::kInvalidArgument,
       "total_bytes is not an unsigned integer"},  // parsed as a double
      {"reason number", Msg::kReason, "7", Code::kInvalidArgument, "FAILOVER/GOODBYE is not a JSON object"},
      {"reason field number", Msg::kReason, R"({"reason":7})", Code::kInvalidArgument,
       "FAILOVER/GOODBYE: reason is not a string"},
      {"reason deep", Msg::kReason, R"({"reason":)" + deep_valid + "}", Code::kInvalidArgument,
       "reason is not a string"},
  };
  for (const auto& c : cases) {
    Status s = DecodeNoThrow(c.msg, c.payload);
    EXPECT_EQ(s.code(), c.code) << c.name << ": " << s.ToString();
    EXPECT_NE(s.message().find(c.needle), std::string::npos) << c.name << ": " << s.message();
  }
}

// Every proper prefix of a valid payload is DataLoss, never a crash or a
// partial message.
TEST(MessagesHostile, Truncated) {
  const std::string config = EncodeConfig(FullConfig());
  for (size_t n = 0; n < config.size(); n++)
    EXPECT_EQ(DecodeNoThrow(Msg::kConfig, std::string_view(config).substr(0, n)).code(), Code::kDataLoss) << n;
  const std::string sync = EncodeSyncBegin({{{"pc.ram", 4096}}, "\x07\x01", 4096});
  for (size_t n = 0; n < sync.size(); n++)
    EXPECT_EQ(DecodeNoThrow(Msg::kSyncBegin, std::string_view(sync).substr(0, n)).code(), Code::kDataLoss) << n;
  const std::string reason = EncodeReason({"gone"});
  for (size_t n = 1; n < reason.size(); n++)  // n == 0 is the empty (older peer) payload
    EXPECT_EQ(DecodeNoThrow(Msg::kReason, std::string_view(reason).substr(0, n)).code(), Code::kDataLoss) << n;
}

// Single-byte corruptions of a valid payload: any outcome but an exception.
TEST(MessagesHostile, FlippedBytes) {
  const std::string config = EncodeConfig(FullConfig());
  for (size_t i = 0; i < config.size(); i++) {
    for (char c : {'\0', '"', '[', '{', '}', '\xff', '1', '-'}) {
      std::string p = config;
      p[i] = c;
      Status s = DecodeNoThrow(Msg::kConfig, p);
      EXPECT_TRUE(s.ok() || s.code() == Code::kDataLoss || s.code() == Code::kInvalidArgument) << s.ToString();
    }
  }
}

}  // namespace
}  // namespace remus::wire
