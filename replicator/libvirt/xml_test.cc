#include "replicator/libvirt/xml.h"

#include <gtest/gtest.h>

namespace remus::libvirt_xml {
namespace {

// fuzz_libvirt_xml found it (tests/fuzz/regressions/fuzz_libvirt_xml/):
// SetText(n, "") left an empty text node, serialized as <uuid></uuid>, which
// parses back as <uuid/>: the text was not a fixed point of parse+serialize.
TEST(LibvirtXml, SetTextEmptyLeavesAnEmptyElementThatSerializesStably) {
  auto doc = ParseDomain("<domain><uuid>1234</uuid></domain>");
  ASSERT_TRUE(doc.ok()) << doc.status().ToString();
  XPath xp(doc->get());
  xmlNode* uuid = xp.First("/domain/uuid");
  ASSERT_NE(uuid, nullptr);
  SetText(uuid, "");
  EXPECT_EQ(Text(uuid), "");
  auto s1 = Serialize(doc->get());
  ASSERT_TRUE(s1.ok());
  EXPECT_EQ(*s1, "<domain><uuid/></domain>\n");
  auto again = Parse(*s1);
  ASSERT_TRUE(again.ok());
  auto s2 = Serialize(again->get());
  ASSERT_TRUE(s2.ok());
  EXPECT_EQ(*s2, *s1);
  SetText(uuid, "5678");
  EXPECT_EQ(*Serialize(doc->get()), "<domain><uuid>5678</uuid></domain>\n");
}

}  // namespace
}  // namespace remus::libvirt_xml
