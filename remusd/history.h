// What happened to each domain on this host, oldest first, kept across
// remusd restarts: the "history" of `remusctl status` (where the guest ran,
// "failed over from 10.0.0.1:7788 at checkpoint 812, token 4711", "protected
// to 10.0.0.1:7788"). The lifecycles report their state changes
// (PrimaryOptions::on_state, BackupOptions::on_state); this turns them into
// one sentence each.
//
// Storage: STATE/history/<domain>.jsonl, one JSON object per line
// {"at": RFC 3339 UTC, "role": "primary"|"backup", "state", "text"},
// appended with O_APPEND (a torn last line from a crash is skipped when
// read). When a file passes kMaxKept * 2 lines it is rewritten with the last
// kMaxKept (write to a temporary file, rename). Informational: a failure to
// write is logged, never fatal, and never fsynced on the checkpoint path.
//
// Thread-safety: public methods are thread-safe. Record may be called with
// a lifecycle's own lock held: this class calls nothing back.
#pragma once

#include <deque>
#include <map>
#include <string>

#include <nlohmann/json.hpp>

#include "common/thread_annotations.h"

namespace remus {

class DomainHistory {
 public:
  static constexpr size_t kMaxKept = 200;

  // dir: STATE/history (created on the first record).
  explicit DomainHistory(std::string dir);

  // Appends {"at": now, ...event}. event must have "text".
  void Record(const std::string& domain, nlohmann::json event) EXCLUDES(mu_);
  // The last n entries of domain, oldest first (an empty array when none).
  nlohmann::json Recent(const std::string& domain, size_t n) const EXCLUDES(mu_);

  // The sentence for a state change: "" when the change is not worth a line.
  // role "primary": peer is the backup; "backup": peer is the primary.
  static std::string PrimaryText(const std::string& to, const std::string& peer, const std::string& why);
  static std::string BackupText(const std::string& to, const std::string& peer, const nlohmann::json& detail);

 private:
  std::string Path(const std::string& domain) const;
  void Compact(const std::string& domain) REQUIRES(mu_);
  // The domain's last kMaxKept entries, read from its file on first use
  // (which also counts the file's lines into lines_).
  std::deque<nlohmann::json>& Cached(const std::string& domain) const REQUIRES(mu_);

  const std::string dir_;
  mutable Mutex mu_;
  // Lines in each file, counted when Cached first reads it (Compact's trigger).
  mutable std::map<std::string, size_t> lines_ GUARDED_BY(mu_);
  // What Recent answers from (status asks often; the file is read once).
  mutable std::map<std::string, std::deque<nlohmann::json>> recent_ GUARDED_BY(mu_);
};

}  // namespace remus
