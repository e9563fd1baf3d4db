#include "client/attend_stream.h"

#include <deque>
#include <utility>
#include <vector>

#include <grpcpp/client_context.h>
#include <grpcpp/support/client_callback.h>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "client/convert.h"

namespace attnserve::client {

// Drives the bidirectional RPC. gRPC allows one write and one read in flight
// at a time, so writes wait in a queue; one read is always outstanding until
// the server closes. Owned by a shared_ptr held by the AttendStream handle and
// by itself until OnDone, so it outlives whichever ends last.
class AttendStream::Reactor
    : public grpc::ClientBidiReactor<v1::AttendRequest, v1::AttendResponse> {
 public:
  explicit Reactor(InFlightCounter::Guard guard) : guard_(std::move(guard)) {}

  void Start(v1::AttentionService::Stub* stub, absl::Duration deadline,
             std::shared_ptr<Reactor> self) {
    self_ = std::move(self);
    if (deadline > absl::ZeroDuration()) {
      context_.set_deadline(absl::ToChronoTime(absl::Now() + deadline));
    }
    stub->async()->AttendStream(&context_, this);
    StartRead(&response_);
    // Keeps the RPC open for writes issued from outside reactions (Send).
    AddHold();
    StartCall();
  }

  absl::Status Send(const v1::AttendRequest* request, ResponseCallback done) {
    bool start_write = false;
    {
      absl::MutexLock lock(&mu_);
      if (half_closed_) {
        return absl::FailedPreconditionError("AttendStream: Send after Finish");
      }
      if (writes_closed_) return absl::UnavailableError("AttendStream: the stream has ended");
      if (!pending_.try_emplace(request->request_id(), std::move(done)).second) {
        return absl::InvalidArgumentError(absl::StrCat(
            "request_id: expected an id unique among outstanding requests, got \"",
            request->request_id(), "\" twice"));
      }
      write_queue_.push_back(request);
      start_write = !writing_;
      writing_ = true;
    }
    if (start_write) WriteNext();
    return absl::OkStatus();
  }

  int64_t outstanding() const {
    absl::MutexLock lock(&mu_);
    return static_cast<int64_t>(pending_.size());
  }

  // Half-closes once the queued writes are out.
  void HalfClose() {
    bool now = false;
    {
      absl::MutexLock lock(&mu_);
      if (half_closed_) return;
      half_closed_ = true;
      // A stream whose writes closed early has released its hold already.
      now = !writing_ && !writes_closed_;
      if (now) writing_ = true;  // nothing else may write any more
    }
    if (now) CloseWrites();
  }

  void Cancel() { context_.TryCancel(); }

  absl::Status WaitDone() {
    absl::MutexLock lock(&mu_);
    mu_.Await(absl::Condition(&done_));
    return final_status_;
  }

  void OnWriteDone(bool ok) override {
    enum class Next { kWrite, kCloseWrites, kReleaseHold, kIdle } next;
    {
      absl::MutexLock lock(&mu_);
      write_queue_.pop_front();
      if (!ok || read_closed_) {
        // The stream is over: what is still queued is never sent, and OnDone
        // reports the final status to every pending call.
        write_queue_.clear();
        writes_closed_ = true;
        next = Next::kReleaseHold;
      } else if (!write_queue_.empty()) {
        next = Next::kWrite;
      } else if (half_closed_) {
        next = Next::kCloseWrites;
      } else {
        writing_ = false;
        next = Next::kIdle;
      }
    }
    switch (next) {
      case Next::kWrite:
        WriteNext();
        break;
      case Next::kCloseWrites:
        CloseWrites();
        break;
      case Next::kReleaseHold:
        RemoveHold();
        break;
      case Next::kIdle:
        break;
    }
  }

  void OnReadDone(bool ok) override {
    if (!ok) {
      // The server closed its side (it answered everything, or a request
      // failed and ended the stream). Stop writing and let the RPC finish so
      // OnDone can report the status, even if the caller never calls Finish.
      bool release = false;
      {
        absl::MutexLock lock(&mu_);
        read_closed_ = true;
        if (!writing_ && !writes_closed_) {
          writing_ = true;  // the write slot is taken for good
          writes_closed_ = true;
          release = true;
        }
      }
      if (release) RemoveHold();
      return;
    }
    ResponseCallback done;
    {
      absl::MutexLock lock(&mu_);
      auto it = pending_.find(response_.request_id());
      if (it != pending_.end()) {
        done = std::move(it->second);
        pending_.erase(it);
      }
    }
    v1::AttendResponse response = std::move(response_);
    response_.Clear();
    StartRead(&response_);
    // A response for an id we do not know is the server's bug; drop it.
    if (done) std::move(done)(std::move(response));
  }

  void OnDone(const grpc::Status& grpc_status) override {
    absl::Status status = FromGrpcStatus(grpc_status);
    std::vector<ResponseCallback> orphans;
    {
      absl::MutexLock lock(&mu_);
      for (auto& [id, done] : pending_) orphans.push_back(std::move(done));
      pending_.clear();
    }
    absl::Status orphan_status =
        status.ok() ? absl::InternalError("AttendStream ended without answering this request")
                    : status;
    for (ResponseCallback& done : orphans) std::move(done)(orphan_status);
    std::shared_ptr<Reactor> keep = std::move(self_);
    absl::MutexLock lock(&mu_);
    final_status_ = status;
    done_ = true;
  }

 private:
  void WriteNext() {
    const v1::AttendRequest* next;
    {
      absl::MutexLock lock(&mu_);
      next = write_queue_.front();
    }
    StartWrite(next);
  }

  // Called once, by whoever holds the write slot (writing_) when the stream
  // half-closes; the hold taken in Start is released with it.
  void CloseWrites() {
    StartWritesDone();
    RemoveHold();
  }

  InFlightCounter::Guard guard_;  // first: released after context_ is gone
  grpc::ClientContext context_;
  v1::AttendResponse response_;  // touched only by the read chain
  std::shared_ptr<Reactor> self_;

  mutable absl::Mutex mu_;
  absl::flat_hash_map<std::string, ResponseCallback> pending_ ABSL_GUARDED_BY(mu_);
  std::deque<const v1::AttendRequest*> write_queue_ ABSL_GUARDED_BY(mu_);
  bool writing_ ABSL_GUARDED_BY(mu_) = false;  // a write (or writes-done) is in flight
  bool half_closed_ ABSL_GUARDED_BY(mu_) = false;   // Finish was called
  bool read_closed_ ABSL_GUARDED_BY(mu_) = false;   // the server closed its side
  // No write will ever start again (a write failed or the server closed);
  // the hold is released.
  bool writes_closed_ ABSL_GUARDED_BY(mu_) = false;
  bool done_ ABSL_GUARDED_BY(mu_) = false;
  absl::Status final_status_ ABSL_GUARDED_BY(mu_);
};

AttendStream::AttendStream(v1::AttentionService::Stub* stub, absl::Duration deadline,
                           InFlightCounter::Guard guard)
    : reactor_(std::make_shared<Reactor>(std::move(guard))) {
  reactor_->Start(stub, deadline, reactor_);
}

AttendStream::~AttendStream() {
  if (!finished_) {
    reactor_->Cancel();
    reactor_->HalfClose();
    reactor_->WaitDone().IgnoreError();
  }
}

absl::Status AttendStream::Send(const v1::AttendRequest* request, ResponseCallback done) {
  return reactor_->Send(request, std::move(done));
}

int64_t AttendStream::outstanding() const { return reactor_->outstanding(); }

absl::Status AttendStream::Finish() {
  finished_ = true;
  reactor_->HalfClose();
  return reactor_->WaitDone();
}

}  // namespace attnserve::client
