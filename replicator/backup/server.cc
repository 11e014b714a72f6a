#include "replicator/backup/server.h"

#include <sys/socket.h>

#include <filesystem>
#include <vector>

#include "common/log.h"

namespace remus {

using nlohmann::json;
using wire::MsgType;

BackupServer::BackupServer(BackupOptions opts, const Clock& clock, std::unique_ptr<Arbiter> arbiter,
                           std::unique_ptr<ProcessLauncher> launcher)
    : opts_(std::move(opts)), clock_(clock), arbiter_(std::move(arbiter)),
      launcher_(launcher ? std::move(launcher) : std::make_unique<PosixSpawnLauncher>()) {}

BackupServer::~BackupServer() {
  stopping_ = true;
  if (listen_fd_.valid()) ::shutdown(listen_fd_.get(), SHUT_RDWR);
  if (accept_thread_.joinable()) accept_thread_.join();
  std::list<Conn> conns;
  {
    MutexLock g(mu_);
    // Pending automatic promotions are called off; sessions end.
    for (auto& [name, d] : domains_) d->Stop();
    for (Conn& c : conns_)
      if (!c.done) ::shutdown(c.fd, SHUT_RDWR);
    conns.swap(conns_);
  }
  for (Conn& c : conns) c.thread.join();
}

Status BackupServer::Listen(const HostPort& addr) {
  ASSIGN_OR_RETURN(listen_fd_, ListenTcp(addr));
  RETURN_IF_ERROR(MakeDirs(opts_.state_dir + "/domains", 0700));
  // Checkpoints committed before a restart stay restorable.
  std::error_code ec;
  for (const auto& e : std::filesystem::directory_iterator(opts_.state_dir + "/domains", ec)) {
    std::string name = e.path().filename().string();
    if (!e.is_directory() || !ValidDomainName(name)) continue;
    auto d = std::make_shared<BackupDomain>(name, opts_, clock_, arbiter_.get(), launcher_.get());
    Status r = d->Recover();
    if (r.ok()) {
      MutexLock g(mu_);
      domains_[name] = std::move(d);
    } else if (r.code() != Code::kNotFound) {
      LOG_ERROR("backup") << "domain " << name << ": cannot recover its checkpoint: " << r.message();
    }
  }
  accept_thread_ = std::thread([this] { AcceptLoop(); });
  LOG_INFO("backup") << "listening on " << addr.ToString();
  return OkStatus();
}

void BackupServer::ReapFinished() {
  for (auto it = conns_.begin(); it != conns_.end();) {
    if (it->done) {
      it->thread.join();  // it has nothing left to do but return
      it = conns_.erase(it);
    } else {
      ++it;
    }
  }
}

void BackupServer::AcceptLoop() {
  while (!stopping_) {
    auto fd = Accept(listen_fd_.get());
    if (!fd.ok()) {
      if (!stopping_) LOG_ERROR("backup") << "accept: " << fd.status().ToString();
      return;
    }
    MutexLock g(mu_);
    ReapFinished();
    int open = static_cast<int>(conns_.size());
    std::string refuse;
    if (open >= opts_.max_connections)
      refuse = std::to_string(open) + " connections are open (limit " + std::to_string(opts_.max_connections) + ")";
    else if (handshakes_ >= opts_.max_handshakes)
      refuse = std::to_string(handshakes_) + " handshakes are in progress (limit " +
               std::to_string(opts_.max_handshakes) + ")";
    if (!refuse.empty()) {
      wire::Link l(std::move(fd).value());
      LOG_WARN("backup") << "refusing connection from " << l.PeerName() << ": " << refuse;
      continue;  // closed here
    }
    handshakes_++;  // counted from accept, so a flood cannot outrun the cap
    Conn& c = conns_.emplace_back();
    c.fd = fd->get();
    c.thread = std::thread([this, f = std::move(fd).value(), conn = &c]() mutable { Serve(std::move(f), conn); });
  }
}

void BackupServer::Serve(Fd fd, Conn* conn) {
  auto link = std::make_unique<wire::Link>(std::move(fd));
  auto domain = wire::ServerHandshake(*link, *opts_.tls, opts_.handshake_timeout_ms);
  {
    MutexLock g(mu_);
    handshakes_--;
  }
  if (!domain.ok()) {
    LOG_WARN("backup") << "refused " << link->PeerName() << ": " << domain.status().message();
  } else if (!ValidDomainName(*domain)) {
    (void)link->Send(MsgType::kError, 0, wire::EncodeError(InvalidArgument("invalid domain name '" + *domain + "'")));
  } else if (!stopping_) {
    GetOrCreate(*domain)->Serve(std::move(link));
  }
  link.reset();  // closes the fd, unless the domain did already
  MutexLock g(mu_);
  conn->done = true;  // from now on its fd number may be reused: never shut down again
}

std::shared_ptr<BackupDomain> BackupServer::GetOrCreate(const std::string& domain) {
  MutexLock g(mu_);
  auto& d = domains_[domain];
  if (!d) d = std::make_shared<BackupDomain>(domain, opts_, clock_, arbiter_.get(), launcher_.get());
  return d;
}

bool BackupServer::HasDomain(const std::string& domain) const {
  MutexLock g(mu_);
  return domains_.count(domain) > 0;
}

int BackupServer::connections() const {
  MutexLock g(mu_);
  int n = 0;
  for (const Conn& c : conns_) n += c.done ? 0 : 1;
  return n;
}

Status BackupServer::Failover(const std::string& domain) {
  std::shared_ptr<BackupDomain> d;
  {
    MutexLock g(mu_);
    auto it = domains_.find(domain);
    if (it == domains_.end()) return NotFound("domain " + domain + " is not replicated to this backup");
    d = it->second;
  }
  return d->Promote("operator requested failover");
}

json BackupServer::StatusJson(const std::string& domain) const {
  std::vector<std::shared_ptr<BackupDomain>> ds;
  {
    MutexLock g(mu_);
    for (const auto& [name, d] : domains_)
      if (domain.empty() || name == domain) ds.push_back(d);
  }
  json arr = json::array();
  for (const auto& d : ds) {
    d->NoticeGuestGone();  // status tells the truth about a promoted guest that exited
    arr.push_back(d->StatusJson());
  }
  return arr;
}

std::optional<BackupDomain::PromotedGuest> BackupServer::RunningGuest(const std::string& domain) const {
  std::shared_ptr<BackupDomain> d;
  {
    MutexLock g(mu_);
    auto it = domains_.find(domain);
    if (it == domains_.end()) return std::nullopt;
    d = it->second;
  }
  return d->RunningGuest();
}

}  // namespace remus
