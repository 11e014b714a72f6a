// libvirt domain XML through libxml2 (libvirt's own parser; libvirt-dev
// pulls in libxml2-dev): parsing, lookups and edits shared by
// libvirt/interfaces.cc and libvirt/restore.cc.
//
// The XML may come from the peer over the replication link (the primary's
// domain XML in CONFIG), so it is parsed as untrusted input: at most
// kMaxDomainXmlBytes, no network access, no DTD (a DOCTYPE is refused before
// its declarations are read, so there are no entities to expand, internal or
// external), libxml2's default limits on depth and node sizes. libvirt's
// domain XML has no DOCTYPE.
//
// Edits keep the rest of the document: whitespace, comments, CDATA,
// namespaces. What Serialize writes back is libxml2's form of it: attributes
// in double quotes, empty elements as <x/>, no XML declaration, UTF-8.
//
// Thread-safety: free functions and per-document objects; a document and
// its XPath must be used by one thread at a time.
#pragma once

#include <libxml/tree.h>
#include <libxml/xpath.h>

#include <initializer_list>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "common/status.h"

namespace remus::libvirt_xml {

// Larger documents are refused (libvirt's RPC limit on a string is 4 MiB).
inline constexpr size_t kMaxDomainXmlBytes = 16 << 20;

struct DocFree {
  void operator()(xmlDoc* d) const { xmlFreeDoc(d); }
};
using Doc = std::unique_ptr<xmlDoc, DocFree>;

// Parses xml (see above). InvalidArgument, naming the line and libxml2's
// reason, if it is not well-formed, too large, or has a DOCTYPE.
StatusOr<Doc> Parse(std::string_view xml);

// Parse, and the root element must be <domain> (InvalidArgument if not).
StatusOr<Doc> ParseDomain(std::string_view xml);

// The document as text (see above). trailing_newline: end it with "\n"
// (libxml2's own form) or not (as a text without one was).
StatusOr<std::string> Serialize(xmlDoc* doc, bool trailing_newline = true);

// Whether n is an element with that name, in no namespace (libvirt's own
// elements; those of other applications, under <metadata>, have one).
bool Named(const xmlNode* n, const char* name);
// An attribute's value, entities decoded; "" if absent.
std::string Prop(const xmlNode* n, const char* name);
bool HasProp(const xmlNode* n, const char* name);
// Sets (or adds, last) an attribute; value is plain text (escaped on output).
void SetProp(xmlNode* n, const char* name, const std::string& value);
// The text of an element: its text and CDATA, comments left out.
std::string Text(const xmlNode* n);
// Replaces an element's children with the plain text text (none when
// text is empty: the element becomes <n/>).
void SetText(xmlNode* n, const std::string& text);
// n's first child element called name; nullptr if none.
xmlNode* Child(const xmlNode* n, const char* name);
// The attribute of n's first child element called child; "" if none.
std::string ChildProp(const xmlNode* n, const char* child, const char* name);
// A new element called name in doc, not yet linked anywhere; attrs in order.
xmlNode* NewElement(xmlDoc* doc, const char* name,
                    std::initializer_list<std::pair<const char*, std::string>> attrs = {});
// Inserts child as the first child of parent.
void PrependChild(xmlNode* parent, xmlNode* child);
// Unlinks and frees n; when it stands on a line of its own, the line goes
// with it (its indentation and the newline after it).
void Remove(xmlNode* n);

// XPath 1.0 over one document.
class XPath {
 public:
  explicit XPath(xmlDoc* doc);
  // Binds prefix to the namespace uri in expressions.
  void Namespace(const char* prefix, const char* uri);
  // The element nodes expr selects (from context, default the document), in
  // document order; empty if none or if expr is not a valid expression.
  std::vector<xmlNode*> Nodes(const char* expr, xmlNode* context = nullptr) const;
  // The first of them; nullptr if none.
  xmlNode* First(const char* expr, xmlNode* context = nullptr) const;

 private:
  struct CtxtFree {
    void operator()(xmlXPathContext* c) const { xmlXPathFreeContext(c); }
  };
  std::unique_ptr<xmlXPathContext, CtxtFree> ctxt_;
};

}  // namespace remus::libvirt_xml
