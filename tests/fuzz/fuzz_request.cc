// libFuzzer target for remusd's control requests (remusd/request.h): one
// line from the control socket, then the field reads the daemon makes.
//
// Input: the request line.
// Checks: ParseRequestLine fails only with InvalidArgument (not JSON, not an
// object, too deep) or ResourceExhausted (too long), and anything deeper
// than kMaxRequestDepth is refused; what parses is an object that dumps to a
// line that parses to the same object; every RequestReader read either
// succeeds with a value of the asked type (an Int within its bounds) or
// fails with InvalidArgument naming the field; nothing throws.
#include <cstdint>
#include <string>
#include <string_view>

#include "remusd/request.h"
#include "tests/fuzz/fuzz_check.h"

namespace {

using namespace remus;
constexpr const char* kTarget = "fuzz_request";

int Depth(const nlohmann::json& j) {
  int d = 0;
  if (j.is_object() || j.is_array())
    for (const auto& v : j) d = std::max(d, Depth(v));
  return (j.is_object() || j.is_array()) ? d + 1 : 0;
}

void CheckRead(const Status& s, std::string_view field) {
  if (s.ok()) return;
  fuzz::CheckCode(s, {Code::kInvalidArgument}, kTarget, "a field read failed with an unexpected code");
  fuzz::Check(s.message().find(field) != std::string::npos, kTarget, "a field error does not name the field");
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string_view line(reinterpret_cast<const char*>(data), size);
  try {
    auto j = ParseRequestLine(line);
    if (!j.ok())
      return fuzz::CheckCode(j.status(), {Code::kInvalidArgument, Code::kResourceExhausted}, kTarget,
                             "unexpected error code"),
             0;
    fuzz::Check(j->is_object(), kTarget, "a request that is not an object");
    fuzz::Check(Depth(*j) <= kMaxRequestDepth, kTarget, "a request nested deeper than the limit");
    auto again = ParseRequestLine(j->dump());
    fuzz::Check(again.ok() && *again == *j, kTarget, "a request does not round trip through dump()");

    RequestReader r(*j, "domain x");
    for (const char* f : {"op", "domain", "qmp", "libvirt_uri", "backup", "netbuf", "compress", "disks", "command"}) {
      auto v = r.String(f, "def");
      CheckRead(v.status(), f);
      if (v.ok() && !r.Has(f)) fuzz::Check(*v == "def", kTarget, "a missing string field did not default");
    }
    for (const char* f : {"async", "netbuf_fallback", "netbuf_fail_open", "domain_stopped"}) CheckRead(r.Bool(f, true).status(), f);
    struct IntField {
      const char* name;
      int64_t min, max;
    };
    for (IntField f : {IntField{"interval_ms", 1, 600000}, IntField{"netbuf_queue_maxlen", 1, UINT32_MAX},
                       IntField{"retry_ms", 0, 24 * 3600 * 1000}, IntField{"any", INT64_MIN, INT64_MAX}}) {
      auto v = r.Int(f.name, f.min, f.min, f.max);
      CheckRead(v.status(), f.name);
      if (v.ok()) fuzz::Check(*v >= f.min && *v <= f.max, kTarget, "an Int outside its bounds");
    }
    auto l = r.StringList("netbuf_interfaces");
    CheckRead(l.status(), "netbuf_interfaces");
    for (const auto& [k, v] : j->items()) {
      (void)v;
      CheckRead(r.In(k).String(k, "").status(), k);
      CheckRead(r.StringList(k).status(), k);
    }
  } catch (...) {
    fuzz::Fail(kTarget, "threw");
  }
  return 0;
}
