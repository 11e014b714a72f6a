#include "arbiter/leftovers.h"

#include <dirent.h>
#include <signal.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>

#include <nlohmann/json.hpp>

#include "common/io.h"
#include "common/log.h"

namespace remus {

using nlohmann::json;

uint64_t ProcessStartTime(int pid) {
  if (pid <= 0) return 0;
  StatusOr<std::string> stat = ReadFileToString("/proc/" + std::to_string(pid) + "/stat");
  if (!stat.ok()) return 0;
  // The command name (field 2) is in parentheses and may hold spaces: count
  // fields from the last ')'.
  size_t p = stat->rfind(')');
  if (p == std::string::npos) return 0;
  int field = 2;
  size_t i = p + 1;
  while (i < stat->size() && field < 22) {
    while (i < stat->size() && (*stat)[i] == ' ') i++;
    field++;
    if (field == 22) return std::strtoull(stat->c_str() + i, nullptr, 10);
    while (i < stat->size() && (*stat)[i] != ' ') i++;
  }
  return 0;
}

static std::string OwnedDir(const std::string& run_dir) { return run_dir + "/owned"; }

Status WriteOwnershipRecord(const std::string& run_dir, const OwnershipRecord& r) {
  RETURN_IF_ERROR(MakeDirs(OwnedDir(run_dir), 0700));
  json j = {{"domain", r.domain}, {"session", r.session}, {"pid", r.pid}, {"pid_start", r.pid_start}};
  return WriteDurable(OwnedDir(run_dir), r.domain + ".json", j.dump());
}

void RemoveOwnershipRecord(const std::string& run_dir, const std::string& domain) {
  ::unlink((OwnedDir(run_dir) + "/" + domain + ".json").c_str());
}

namespace {

bool Alive(const OwnershipRecord& r) { return r.pid_start != 0 && ProcessStartTime(r.pid) == r.pid_start; }

LeftoverOutcome Resolve(const OwnershipRecord& r, const ArbiterOptions& o, etcd::Kv* kv) {
  LeftoverOutcome out{r.domain, r.pid, "undecided", ""};
  const std::string owner_key = OwnerKey(o, r.domain), session_key = SessionKey(o, r.domain);
  const bool alive = Alive(r);
  // Ours if the session is still ours and the key is free: retire it.
  etcd::TxnRequest t;
  t.compare = {etcd::Compare::Absent(owner_key), etcd::Compare::ValueIs(session_key, r.session)};
  t.success = {etcd::Op::Put(session_key, "retired:" + r.session)};
  t.failure = {etcd::Op::Get(owner_key), etcd::Op::Get(session_key)};
  StatusOr<etcd::TxnResult> res = kv->Txn(t);
  if (!res.ok()) {
    out.detail = res.status().message();
    return out;
  }
  auto kill = [&](const std::string& why) {
    if (alive && ::kill(r.pid, SIGKILL) != 0) {
      out.detail = why + "; killing QEMU pid " + std::to_string(r.pid) + " failed: " + std::to_string(errno);
      return;
    }
    out.action = alive ? "killed" : "gone";
    out.detail = why;
  };
  // Ours to run on: the fence watchdog of the dead remusd may have stopped
  // it at its deadline.
  auto run_on = [&] {
    if (alive) ::kill(r.pid, SIGCONT);
  };
  if (res->succeeded) {
    run_on();
    out.action = alive ? "retired" : "gone";
    out.detail = "session " + r.session + " retired in etcd: no backup can promote it" +
                 (alive ? std::string("; the guest runs on unprotected") : std::string());
    return out;
  }
  const auto& owner = res->gets.size() > 0 ? res->gets[0] : std::nullopt;
  const auto& sess = res->gets.size() > 1 ? res->gets[1] : std::nullopt;
  const std::string sv = sess ? sess->value : "";
  if (owner) {
    OwnerRecord rec = OwnerRecord::Decode(owner->value);
    if (rec.host == o.host && rec.session == r.session && sv == r.session) {
      // Still held by our dead instance's lease: retire and let it go.
      etcd::TxnRequest t2;
      t2.compare = {etcd::Compare::ModRevisionIs(owner_key, owner->mod_revision),
                    etcd::Compare::ValueIs(session_key, r.session)};
      t2.success = {etcd::Op::Put(session_key, "retired:" + r.session), etcd::Op::Delete(owner_key)};
      StatusOr<etcd::TxnResult> r2 = kv->Txn(t2);
      if (!r2.ok()) {
        out.detail = r2.status().message();
        return out;
      }
      if (!r2->succeeded) {
        out.detail = "the ownership key changed while it was being retired; trying again at the next start";
        return out;
      }
      if (owner->lease) (void)kv->Revoke(owner->lease);
      run_on();
      out.action = alive ? "retired" : "gone";
      out.detail = "session " + r.session + " retired in etcd (its lease was still ours)";
      return out;
    }
    kill("host '" + rec.host + "' owns domain " + r.domain + " now (token " + std::to_string(owner->mod_revision) + ")");
    return out;
  }
  if (sv == "retired:" + r.session) {
    run_on();
    out.action = alive ? "retired" : "gone";
    out.detail = "session " + r.session + " was retired already";
    return out;
  }
  kill("session " + r.session + " is no longer this host's (etcd: '" + sv + "')");
  return out;
}

}  // namespace

std::vector<LeftoverOutcome> ResolveLeftovers(const std::string& run_dir, const ArbiterOptions& opts, etcd::Kv* kv,
                                              bool* undecided) {
  *undecided = false;
  std::vector<LeftoverOutcome> outs;
  DIR* d = ::opendir(OwnedDir(run_dir).c_str());
  if (!d) return outs;
  std::vector<std::string> files;
  while (dirent* e = ::readdir(d)) {
    std::string n = e->d_name;
    if (n.size() > 5 && n.compare(n.size() - 5, 5, ".json") == 0) files.push_back(n);
  }
  ::closedir(d);
  for (const auto& f : files) {
    const std::string path = OwnedDir(run_dir) + "/" + f;
    StatusOr<std::string> text = ReadFileToString(path);
    json j = text.ok() ? json::parse(*text, nullptr, false) : json();
    OwnershipRecord r;
    if (j.is_object()) {
      r.domain = j.value("domain", "");
      r.session = j.value("session", "");
      r.pid = j.value("pid", -1);
      r.pid_start = j.value("pid_start", uint64_t{0});
    }
    if (r.domain.empty() || r.session.empty()) {
      outs.push_back({f, -1, "undecided", path + " is unreadable; remove it once the guest's owner is known"});
      *undecided = true;
      continue;
    }
    LeftoverOutcome o = Resolve(r, opts, kv);
    if (o.action == "undecided") *undecided = true;
    else ::unlink(path.c_str());
    outs.push_back(std::move(o));
  }
  return outs;
}

}  // namespace remus
