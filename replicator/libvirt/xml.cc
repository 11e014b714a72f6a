#include "replicator/libvirt/xml.h"

#include <libxml/parser.h>
#include <libxml/xmlerror.h>
#include <libxml/xmlsave.h>
#include <libxml/xmlversion.h>
#include <libxml/xpathInternals.h>

#include <algorithm>
#include <mutex>

namespace remus::libvirt_xml {
namespace {

void InitOnce() {
  static std::once_flag init;
  std::call_once(init, [] { xmlInitParser(); });
}

struct ParserCtxtFree {
  void operator()(xmlParserCtxt* c) const { xmlFreeParserCtxt(c); }
};

// What the parser saw, beyond the document (ctxt->_private).
struct ParseState {
  bool doctype = false;
  std::string error;  // the first error: ": line N: reason"
};

// SAX: a DOCTYPE. Stops the parser before the DTD's declarations are read.
void RefuseDoctype(void* ctx, const xmlChar*, const xmlChar*, const xmlChar*) {
  auto* ctxt = static_cast<xmlParserCtxt*>(ctx);
  static_cast<ParseState*>(ctxt->_private)->doctype = true;
  xmlStopParser(ctxt);
}

// SAX: an error. The first one names the cause (the last is often only
// "Premature end of data").
#if LIBXML_VERSION >= 21200
using ErrorArg = const xmlError*;
#else
using ErrorArg = xmlError*;  // libxml2 < 2.12 (Debian 12: 2.9)
#endif
void RecordError(void* ctx, ErrorArg e) {
  auto* st = static_cast<ParseState*>(static_cast<xmlParserCtxt*>(ctx)->_private);
  if (!st->error.empty() || !e || !e->message || e->level < XML_ERR_ERROR) return;
  std::string why = e->message;
  while (!why.empty() && (why.back() == '\n' || why.back() == ' ')) why.pop_back();
  std::replace(why.begin(), why.end(), '\n', ' ');
  st->error = ": line " + std::to_string(e->line) + ": " + why;
}

std::string Str(const xmlChar* s) { return s ? reinterpret_cast<const char*>(s) : ""; }

std::string TakeStr(xmlChar* s) {
  std::string r = Str(s);
  xmlFree(s);
  return r;
}

}  // namespace

StatusOr<Doc> Parse(std::string_view xml) {
  InitOnce();
  if (xml.empty()) return InvalidArgument("domain XML is not well-formed: it is empty");
  if (xml.size() > kMaxDomainXmlBytes)
    return InvalidArgument("domain XML is " + std::to_string(xml.size()) + " bytes, more than the " +
                           std::to_string(kMaxDomainXmlBytes >> 20) + " MiB accepted");
  std::unique_ptr<xmlParserCtxt, ParserCtxtFree> ctxt(xmlNewParserCtxt());
  if (!ctxt || !ctxt->sax) return Internal("cannot allocate an XML parser");
  ParseState state;
  ctxt->_private = &state;
  ctxt->sax->internalSubset = RefuseDoctype;
  ctxt->sax->serror = RecordError;  // instead of printing (and XML_PARSE_NOERROR)
  // No XML_PARSE_NOENT (entities stay references), DTDLOAD, DTDATTR,
  // XINCLUDE or HUGE; NONET in case anything would still load.
  Doc doc(xmlCtxtReadMemory(ctxt.get(), xml.data(), static_cast<int>(xml.size()), "domain.xml", nullptr,
                            XML_PARSE_NONET | XML_PARSE_NOERROR | XML_PARSE_NOWARNING));
  if (state.doctype || (doc && (doc->intSubset || doc->extSubset)))
    return InvalidArgument("domain XML has a DOCTYPE (libvirt writes none; refused: a DTD can declare entities)");
  if (!doc) {
    std::string why = state.error;
    if (why.empty()) {
      ErrorArg e = xmlCtxtGetLastError(ctxt.get());
      if (e && e->message) {
        RecordError(ctxt.get(), e);
        why = state.error;
      }
    }
    return InvalidArgument("domain XML is not well-formed" + why);
  }
  return doc;
}

StatusOr<Doc> ParseDomain(std::string_view xml) {
  ASSIGN_OR_RETURN(Doc doc, Parse(xml));
  const xmlNode* root = xmlDocGetRootElement(doc.get());
  if (!Named(root, "domain"))
    return InvalidArgument("domain XML has no <domain> root element");
  return doc;
}

StatusOr<std::string> Serialize(xmlDoc* doc, bool trailing_newline) {
  struct BufferFree {
    void operator()(xmlBuffer* b) const { xmlBufferFree(b); }
  };
  std::unique_ptr<xmlBuffer, BufferFree> buf(xmlBufferCreate());
  if (!buf) return Internal("cannot allocate an XML buffer");
  xmlSaveCtxt* save = xmlSaveToBuffer(buf.get(), "UTF-8", XML_SAVE_NO_DECL | XML_SAVE_AS_XML);
  if (!save) return Internal("cannot serialize the domain XML");
  long w = xmlSaveDoc(save, doc);
  if (xmlSaveClose(save) < 0 || w < 0) return Internal("cannot serialize the domain XML");
  std::string out(reinterpret_cast<const char*>(xmlBufferContent(buf.get())), xmlBufferLength(buf.get()));
  if (!trailing_newline && !out.empty() && out.back() == '\n') out.pop_back();
  return out;
}

bool Named(const xmlNode* n, const char* name) {
  return n && n->type == XML_ELEMENT_NODE && !n->ns && xmlStrEqual(n->name, BAD_CAST name);
}

std::string Prop(const xmlNode* n, const char* name) {
  return TakeStr(xmlGetNoNsProp(n, BAD_CAST name));
}

bool HasProp(const xmlNode* n, const char* name) { return xmlHasNsProp(n, BAD_CAST name, nullptr) != nullptr; }

void SetProp(xmlNode* n, const char* name, const std::string& value) {
  xmlSetNsProp(n, nullptr, BAD_CAST name, BAD_CAST value.c_str());
}

std::string Text(const xmlNode* n) { return TakeStr(xmlNodeGetContent(n)); }

void SetText(xmlNode* n, const std::string& text) {
  while (xmlNode* c = n->children) {
    xmlUnlinkNode(c);
    xmlFreeNode(c);
  }
  // No empty text node: it serializes as <a></a>, which parses back as <a/>
  // (found by fuzz_libvirt_xml: a document that did not serialize stably).
  if (!text.empty()) xmlAddChild(n, xmlNewDocTextLen(n->doc, BAD_CAST text.data(), static_cast<int>(text.size())));
}

xmlNode* Child(const xmlNode* n, const char* name) {
  for (xmlNode* c = n->children; c; c = c->next)
    if (Named(c, name)) return c;
  return nullptr;
}

std::string ChildProp(const xmlNode* n, const char* child, const char* name) {
  const xmlNode* c = Child(n, child);
  return c ? Prop(c, name) : "";
}

xmlNode* NewElement(xmlDoc* doc, const char* name, std::initializer_list<std::pair<const char*, std::string>> attrs) {
  xmlNode* n = xmlNewDocNode(doc, nullptr, BAD_CAST name, nullptr);
  for (const auto& [k, v] : attrs) SetProp(n, k, v);
  return n;
}

void PrependChild(xmlNode* parent, xmlNode* child) {
  if (parent->children) xmlAddPrevSibling(parent->children, child);
  else xmlAddChild(parent, child);
}

void Remove(xmlNode* n) {
  xmlNode *prev = n->prev, *next = n->next;
  if (prev && next && prev->type == XML_TEXT_NODE && next->type == XML_TEXT_NODE) {
    std::string before = Str(prev->content), after = Str(next->content);
    size_t k = before.find_last_not_of(" \t");
    if (k != std::string::npos && before[k] == '\n' && !after.empty() && after[0] == '\n') {
      xmlNodeSetContent(prev, BAD_CAST before.substr(0, k + 1).c_str());  // text nodes: taken as is
      xmlNodeSetContent(next, BAD_CAST after.substr(1).c_str());
    }
  }
  xmlUnlinkNode(n);
  xmlFreeNode(n);
}

XPath::XPath(xmlDoc* doc) : ctxt_(xmlXPathNewContext(doc)) {}

void XPath::Namespace(const char* prefix, const char* uri) {
  if (ctxt_) xmlXPathRegisterNs(ctxt_.get(), BAD_CAST prefix, BAD_CAST uri);
}

std::vector<xmlNode*> XPath::Nodes(const char* expr, xmlNode* context) const {
  std::vector<xmlNode*> out;
  if (!ctxt_) return out;
  ctxt_->node = context ? context : reinterpret_cast<xmlNode*>(ctxt_->doc);
  xmlXPathObject* r = xmlXPathEvalExpression(BAD_CAST expr, ctxt_.get());
  if (!r) return out;
  if (r->type == XPATH_NODESET && r->nodesetval)
    for (int i = 0; i < r->nodesetval->nodeNr; ++i)
      if (r->nodesetval->nodeTab[i]->type == XML_ELEMENT_NODE) out.push_back(r->nodesetval->nodeTab[i]);
  xmlXPathFreeObject(r);
  return out;
}

xmlNode* XPath::First(const char* expr, xmlNode* context) const {
  auto n = Nodes(expr, context);
  return n.empty() ? nullptr : n.front();
}

}  // namespace remus::libvirt_xml
