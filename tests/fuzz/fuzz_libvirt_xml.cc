// libFuzzer target for the libvirt domain XML parser (replicator/libvirt/xml.h):
// the primary's domain XML reaches the backup in CONFIG, so it is untrusted.
//
// Input: the XML (ParseDomain; byte 0 odd: Parse, any root).
// Checks: errors are InvalidArgument; a parsed document serializes to text
// that parses again and serializes to the same text; the lookups and edits
// restore.cc and interfaces.cc use (XPath, Prop, Text, Child, SetProp,
// SetText, NewElement, PrependChild, Remove) keep the document well formed.
#include <cstdint>
#include <string>
#include <string_view>

#include "replicator/libvirt/xml.h"
#include "tests/fuzz/fuzz_check.h"

namespace {

using namespace remus;
namespace x = remus::libvirt_xml;
constexpr const char* kTarget = "fuzz_libvirt_xml";

// Serialize, parse, serialize: the same text.
std::string Stable(xmlDoc* doc, const char* what) {
  auto s1 = x::Serialize(doc);
  if (!s1.ok()) fuzz::Fail(kTarget, what, s1.status());
  auto d2 = x::Parse(*s1);
  if (!d2.ok()) fuzz::Fail(kTarget, what, d2.status());
  auto s2 = x::Serialize(d2->get());
  fuzz::Check(s2.ok() && *s2 == *s1, kTarget, what);
  return *s1;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  std::string_view xml(reinterpret_cast<const char*>(data) + 1, size - 1);
  try {
    auto doc = (data[0] & 1) ? x::Parse(xml) : x::ParseDomain(xml);
    if (!doc.ok())
      return fuzz::CheckCode(doc.status(), {Code::kInvalidArgument}, kTarget, "unexpected error code"), 0;
    xmlNode* root = xmlDocGetRootElement(doc->get());
    fuzz::Check(root != nullptr, kTarget, "a parsed document without a root");
    if (!(data[0] & 1)) fuzz::Check(x::Named(root, "domain"), kTarget, "ParseDomain accepted another root");
    Stable(doc->get(), "a parsed document does not serialize stably");

    // What restore.cc and interfaces.cc look up and change.
    x::XPath xp(doc->get());
    std::string name = x::Text(xp.First("/domain/name"));
    for (xmlNode* n : xp.Nodes("/domain/devices/interface")) {
      std::string type = x::Prop(n, "type");
      std::string dev = x::ChildProp(n, "target", "dev");
      std::string mac = x::ChildProp(n, "mac", "address");
      if (xmlNode* t = x::Child(n, "target")) x::SetProp(t, "dev", dev + type + mac);
    }
    for (xmlNode* n : xp.Nodes("/domain/devices/disk/source")) x::SetProp(n, "file", x::Prop(n, "file") + name);
    if (xmlNode* u = xp.First("/domain/uuid")) x::SetText(u, x::Text(u) + name);
    xmlNode* mark = x::NewElement(doc->get(), "remus", {{"name", name}, {"at", "\"<&>'"}});
    x::PrependChild(root, mark);
    Stable(doc->get(), "an edited document does not serialize stably");
    for (xmlNode* n : xp.Nodes("/domain/devices/interface")) x::Remove(n);  // siblings: none inside another
    x::Remove(mark);
    Stable(doc->get(), "a document with nodes removed does not serialize stably");
  } catch (...) {
    fuzz::Fail(kTarget, "threw");
  }
  return 0;
}
