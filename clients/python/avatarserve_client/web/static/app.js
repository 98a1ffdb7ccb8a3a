// AvatarServe web page: the microphone goes to the server over WebRTC, the avatar's video and
// audio come back on the same peer connection, control and live numbers on a data channel.
//
// window.avatarserve is the page's programmatic surface (the buttons use it; so do automated
// browser tests): start(), interrupt(), stop(), status(), plus diagnostics (frame capture and
// audio recording with timestamps on the page's performance.now() clock).
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const params = new URLSearchParams(location.search);
  const FPS_WINDOW_MS = 1000;

  const st = {
    pc: null, dc: null, mic: null, remote: null,
    sessionId: null, geometry: null, phase: "idle",
    ice: "new", conn: "new", error: null,
    photo: null,                 // data URL of the chosen photo; null: the server's default face
    messages: [],                // data channel messages: {t: performance.now(), msg}
    frameMarks: [],              // server "frame" messages (a block starts showing at track frame n)
    presented: [],               // recent rVFC samples for the fps readout
    fps: null, latencyMs: null, genMs: null, jitterBufferMs: null, lost: 0, dropped: 0,
    showing: null,               // last "frame" message: {block, idle, ...}
    firstFrameAt: null,          // performance.now() of the first presented frame
    timing: {},                  // performance.now() of each step of start()
    frames: 0,                   // rVFC callbacks so far
    statsTimer: null,
  };

  // ---------------------------------------------------------------------------------------
  // UI helpers

  function setText(id, text) { const el = $(id); if (el) el.textContent = text; }
  function showError(text) {
    st.error = text;
    const el = $("error");
    el.textContent = text;
    el.hidden = !text;
  }
  function logEvent(text) {
    const li = document.createElement("li");
    li.textContent = `${(performance.now() / 1000).toFixed(2)} s  ${text}`;
    const list = $("events");
    list.prepend(li);
    while (list.children.length > 60) list.lastChild.remove();
  }
  function setPhase(phase) {
    st.phase = phase;
    $("start").disabled = phase !== "idle";
    $("stop").disabled = phase === "idle";
    $("interrupt").disabled = phase !== "live";
    $("setup").disabled = phase !== "idle";
    const overlay = $("overlay");
    overlay.hidden = phase === "live";
    overlay.textContent = { idle: "Not connected", connecting: "Connecting...", live: "" }[phase] || phase;
  }
  function option(id, name) {
    // URL parameters (?aec=0) override the checkboxes (handy for tests and kiosks)
    if (params.has(name)) return params.get(name) !== "0" && params.get(name) !== "false";
    return $(id).checked;
  }

  // ---------------------------------------------------------------------------------------
  // Photo

  $("photo").addEventListener("change", () => {
    const file = $("photo").files[0];
    if (!file) return;
    const reader = new FileReader();
    reader.onload = () => { st.photo = reader.result; $("preview").src = reader.result; };
    reader.onerror = () => showError(`cannot read ${file.name}`);
    reader.readAsDataURL(file);
  });
  $("default-photo").addEventListener("click", () => {
    st.photo = null;
    $("photo").value = "";
    $("preview").src = "/api/default-face";
  });

  // ---------------------------------------------------------------------------------------
  // Connection

  function waitIceGathering(pc, timeoutMs) {
    if (pc.iceGatheringState === "complete") return Promise.resolve();
    return new Promise((resolve) => {
      const done = () => { pc.removeEventListener("icegatheringstatechange", check); resolve(); };
      const check = () => { if (pc.iceGatheringState === "complete") done(); };
      pc.addEventListener("icegatheringstatechange", check);
      setTimeout(done, timeoutMs);  // the host candidates are there long before this
    });
  }

  async function start(opts = {}) {
    if (st.phase !== "idle") throw new Error("already started");
    showError("");
    setPhase("connecting");
    const mark = (name) => { st.timing[name] = performance.now(); };
    st.timing = {};
    mark("start");
    try {
      const config = await (await fetch("/api/config")).json();
      const pc = new RTCPeerConnection({ iceServers: (config.ice_servers || []).map((u) => ({ urls: u })) });
      st.pc = pc;
      st.dc = pc.createDataChannel("control");
      st.dc.onmessage = (e) => onMessage(e.data);
      st.dc.onopen = () => logEvent("data channel open");
      // sendrecv: the microphone goes out and the avatar's audio comes back on this transceiver
      st.audioSender = pc.addTransceiver("audio", { direction: "sendrecv" }).sender;
      pc.addTransceiver("video", { direction: "recvonly" });
      // opts.deferMicrophone: connect first, call openMicrophone() later (tests time the speech from there)
      if (!opts.deferMicrophone) await openMicrophone();
      st.remote = new MediaStream();
      pc.ontrack = (e) => {
        const stream = e.streams && e.streams[0] ? e.streams[0] : st.remote;
        if (stream === st.remote) st.remote.addTrack(e.track);
        st.remote = stream;
        const video = $("avatar");
        if (video.srcObject !== stream) video.srcObject = stream;
        video.play().catch((err) => logEvent(`play(): ${err.message} (click the video to start it)`));
      };
      pc.oniceconnectionstatechange = () => { st.ice = pc.iceConnectionState; updateConn(); };
      pc.onconnectionstatechange = () => {
        st.conn = pc.connectionState;
        updateConn();
        if (pc.connectionState === "connected") { st.timing.connected = performance.now(); setPhase("live"); }
        if (pc.connectionState === "failed") { showError("WebRTC connection failed"); stop(); }
      };
      await pc.setLocalDescription(await pc.createOffer());
      mark("offer");
      await waitIceGathering(pc, 3000);
      mark("ice_gathered");
      const body = {
        sdp: pc.localDescription.sdp, type: pc.localDescription.type,
        image: opts.image !== undefined ? opts.image : st.photo,
        prompt: opts.prompt !== undefined ? opts.prompt : $("prompt").value,
      };
      if (opts.seed !== undefined) body.seed = opts.seed;
      const resp = await fetch("/api/offer", {
        method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
      });
      const answer = await resp.json().catch(() => ({ error: `HTTP ${resp.status}` }));
      if (!resp.ok) throw new Error(answer.error || `HTTP ${resp.status}`);
      mark("answer");
      st.sessionId = answer.session_id;
      st.geometry = answer.geometry;
      setText("r-session", `${answer.session_id} (${answer.geometry.width}x${answer.geometry.height}, ${answer.geometry.fps} fps)`);
      await pc.setRemoteDescription({ type: answer.type, sdp: answer.sdp });
      watchFrames();
      st.statsTimer = setInterval(pollStats, 1000);
      logEvent(`session ${answer.session_id}`);
      return { session_id: st.sessionId, geometry: st.geometry };
    } catch (err) {
      showError(String(err.message || err));
      await stop();
      throw err;
    }
  }

  async function openMicrophone() {
    if (!st.audioSender) throw new Error("not started");
    if (st.mic) return st.timing.microphone;
    st.mic = await navigator.mediaDevices.getUserMedia({
      audio: {
        echoCancellation: option("aec", "aec"), noiseSuppression: option("ns", "ns"),
        autoGainControl: option("agc", "agc"), channelCount: 1,
      },
      video: false,
    });
    await st.audioSender.replaceTrack(st.mic.getAudioTracks()[0]);
    st.timing.microphone = performance.now();
    if (audioRec.ctx && !audioRec.sources.mic && audioRec.names.includes("mic")) audioRec.tap("mic", st.mic);
    return st.timing.microphone;
  }

  async function stop() {
    if (st.statsTimer) clearInterval(st.statsTimer);
    st.statsTimer = null;
    if (st.pc) st.pc.close();
    if (st.mic) st.mic.getTracks().forEach((t) => t.stop());
    st.pc = null; st.dc = null; st.mic = null; st.audioSender = null;
    $("avatar").srcObject = null;
    st.conn = "closed";
    updateConn();
    setPhase("idle");
  }

  function interrupt() {
    if (!st.dc || st.dc.readyState !== "open") return false;
    st.dc.send(JSON.stringify({ type: "interrupt" }));
    logEvent("interrupt");
    return true;
  }

  function updateConn() { setText("r-conn", `${st.conn} (ICE ${st.ice})`); }

  // ---------------------------------------------------------------------------------------
  // Server messages

  function onMessage(data) {
    let msg;
    try { msg = JSON.parse(data); } catch (e) { return; }
    st.messages.push({ t: performance.now(), msg });
    if (st.messages.length > 5000) st.messages.splice(0, 1000);
    switch (msg.type) {
      case "frame":
        st.frameMarks.push(msg);
        if (st.frameMarks.length > 2000) st.frameMarks.splice(0, 500);
        st.showing = msg;
        // speech blocks only: an idle block's audio is silence the server filled in on its own clock
        if (msg.latency_ms != null && !msg.idle) st.latencyMs = msg.latency_ms;
        if (msg.gen_ms != null && !msg.idle) st.genMs = msg.gen_ms;
        setText("r-state", msg.idle ? "listening (idle)" : "speaking");
        setText("r-latency", st.latencyMs != null ? `${Math.round(st.latencyMs)} ms` : "-");
        setText("r-gen", st.genMs != null ? `${Math.round(st.genMs)} ms` : "-");
        break;
      case "event":
        logEvent(msg.kind + (msg.utterance ? ` (utterance ${msg.utterance.index}, played ${msg.utterance.played_ms} ms)` : "")
          + (msg.message ? `: ${msg.message}` : ""));
        break;
      case "error":
        showError(msg.message);
        break;
      case "ended":
        logEvent("stream ended");
        break;
      default:
        break;
    }
  }

  // ---------------------------------------------------------------------------------------
  // Received video: fps, frame numbers, capture

  const capture = { on: false, frames: [], canvas: null, ctx: null, max: 3000 };

  function trackFrameNumber(meta) {
    // The server's video track counts frames from 0 and advances the RTP clock 90000/fps per
    // frame; the browser's mediaTime counts from the first frame it received.
    const fps = st.geometry ? st.geometry.fps : 25;
    return typeof meta.mediaTime === "number" ? Math.round(meta.mediaTime * fps) : null;
  }

  function markFor(n) {
    // the server's last "frame" message at or before track frame n
    let best = null;
    for (let i = st.frameMarks.length - 1; i >= 0; i--) {
      if (st.frameMarks[i].n <= n) { best = st.frameMarks[i]; break; }
    }
    return best;
  }

  function watchFrames() {
    const video = $("avatar");
    if (!("requestVideoFrameCallback" in HTMLVideoElement.prototype)) {
      logEvent("this browser has no requestVideoFrameCallback: fps from getStats only");
      return;
    }
    const onFrame = (now, meta) => {
      const t = meta.presentationTime || now;
      st.frames += 1;
      if (st.firstFrameAt === null) st.firstFrameAt = t;
      st.presented.push({ t, count: meta.presentedFrames });
      while (st.presented.length > 2 && t - st.presented[0].t > FPS_WINDOW_MS) st.presented.shift();
      if (st.presented.length >= 2) {
        const a = st.presented[0], b = st.presented[st.presented.length - 1];
        if (b.t > a.t) st.fps = ((b.count - a.count) * 1000) / (b.t - a.t);
      }
      setText("r-fps", st.fps != null ? st.fps.toFixed(1) : "-");
      if (capture.on && capture.frames.length < capture.max) grab(video, meta, t);
      if (st.pc) video.requestVideoFrameCallback(onFrame);
    };
    video.requestVideoFrameCallback(onFrame);
  }

  function grab(video, meta, t) {
    const w = video.videoWidth, h = video.videoHeight;
    if (!w || !h) return;
    if (!capture.canvas || capture.canvas.width !== w || capture.canvas.height !== h) {
      capture.canvas = document.createElement("canvas");
      capture.canvas.width = w; capture.canvas.height = h;
      capture.ctx = capture.canvas.getContext("2d", { willReadFrequently: true });
    }
    capture.ctx.drawImage(video, 0, 0, w, h);
    const rgba = capture.ctx.getImageData(0, 0, w, h).data;
    const rgb = new Uint8Array(w * h * 3);
    for (let i = 0, j = 0; i < rgba.length; i += 4, j += 3) {
      rgb[j] = rgba[i]; rgb[j + 1] = rgba[i + 1]; rgb[j + 2] = rgba[i + 2];
    }
    capture.frames.push({
      t, expected: meta.expectedDisplayTime, media_time: meta.mediaTime, rtp: meta.rtpTimestamp,
      presented: meta.presentedFrames, receive_time: meta.receiveTime, capture_time: meta.captureTime,
      processing: meta.processingDuration, n: trackFrameNumber(meta), width: w, height: h, rgb,
    });
  }

  function b64(bytes) {
    let s = "";
    for (let i = 0; i < bytes.length; i += 0x8000) s += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
    return btoa(s);
  }

  // ---------------------------------------------------------------------------------------
  // getStats: jitter buffer, loss, drops

  async function pollStats() {
    if (!st.pc) return;
    const report = await st.pc.getStats();
    report.forEach((s) => {
      if (s.type === "inbound-rtp" && s.kind === "video") {
        if (s.jitterBufferEmittedCount) st.jitterBufferMs = (1000 * s.jitterBufferDelay) / s.jitterBufferEmittedCount;
        st.lost = s.packetsLost || 0;
        st.dropped = s.framesDropped || 0;
        st.statsFps = s.framesPerSecond;
        st.framesDecoded = s.framesDecoded;
        st.framesReceived = s.framesReceived;
        st.freezes = s.freezeCount;
        st.freezesMs = s.totalFreezesDuration != null ? 1000 * s.totalFreezesDuration : undefined;
      }
    });
    setText("r-jb", st.jitterBufferMs != null ? `${Math.round(st.jitterBufferMs)} ms` : "-");
    setText("r-drop", `${st.lost} packets / ${st.dropped} frames`);
  }

  // ---------------------------------------------------------------------------------------
  // Audio recording (diagnostics): samples with their time on the performance.now() clock

  const WORKLET = `
    class Recorder extends AudioWorkletProcessor {
      constructor() { super(); this.buf = new Float32Array(2048); this.fill = 0; this.start = 0; }
      process(inputs) {
        const ch = inputs[0] && inputs[0][0];
        if (ch) {
          if (this.fill === 0) this.start = currentFrame;
          this.buf.set(ch, this.fill);
          this.fill += ch.length;
          if (this.fill + 128 > this.buf.length) {
            this.port.postMessage({ frame: this.start, data: this.buf.slice(0, this.fill) });
            this.fill = 0;
          }
        }
        return true;
      }
    }
    registerProcessor("avatarserve-recorder", Recorder);`;

  const audioRec = { ctx: null, sources: {}, clock: [], tap: null, names: [] };

  async function recordAudio(names = ["mic", "remote"]) {
    // Records the microphone ("mic") and/or the avatar's audio ("remote") in one AudioContext; the playout of
    // the avatar's audio is watched either way.
    watchPlayout();
    if (audioRec.ctx) return;
    audioRec.names = names;
    const ctx = new AudioContext();
    audioRec.ctx = ctx;
    await ctx.audioWorklet.addModule(URL.createObjectURL(new Blob([WORKLET], { type: "text/javascript" })));
    const tap = (name, stream) => {
      const src = ctx.createMediaStreamSource(stream);
      const node = new AudioWorkletNode(ctx, "avatarserve-recorder", { numberOfInputs: 1, numberOfOutputs: 0 });
      const rec = { chunks: [], node, src };
      node.port.onmessage = (e) => rec.chunks.push(e.data);
      src.connect(node);
      audioRec.sources[name] = rec;
    };
    audioRec.tap = tap;
    if (st.mic && names.includes("mic")) tap("mic", st.mic);
    if (names.includes("remote") && st.remote && st.remote.getAudioTracks().length) {
      tap("remote", new MediaStream(st.remote.getAudioTracks()));
    }
    await ctx.resume();
    const sample = () => {
      if (!audioRec.ctx) return;
      audioRec.clock.push({ context: ctx.currentTime, perf: performance.now(), out: ctx.getOutputTimestamp() });
      if (audioRec.clock.length > 4000) audioRec.clock.splice(0, 1000);
      setTimeout(sample, 50);
    };
    sample();
  }

  // The avatar audio's playout as the receiver reports it: (time, RTP timestamp, level) of the last packet
  // played, polled every 10 ms (RTCRtpReceiver.getSynchronizationSources).
  const playout = { timer: null, samples: [] };
  function watchPlayout() {
    if (playout.timer || !st.pc) return;
    const receiver = st.pc.getReceivers().find((r) => r.track && r.track.kind === "audio");
    if (!receiver) return;
    let last = null;
    playout.timer = setInterval(() => {
      for (const s of receiver.getSynchronizationSources()) {
        if (last && s.rtpTimestamp === last) continue;
        last = s.rtpTimestamp;
        playout.samples.push({ t: s.timestamp, perf: performance.now(), rtp: s.rtpTimestamp, level: s.audioLevel });
      }
      if (playout.samples.length > 20000) playout.samples.splice(0, 5000);
    }, 10);
  }

  function takeAudio(name) {
    const rec = audioRec.sources[name];
    if (!rec) return null;
    const chunks = rec.chunks.splice(0);
    return {
      sample_rate: audioRec.ctx.sampleRate,
      chunks: chunks.map((c) => ({ frame: c.frame, data: b64(new Uint8Array(c.data.buffer)) })),
      clock: audioRec.clock.map((c) => ({ context: c.context, perf: c.perf,
        out_context: c.out.contextTime, out_perf: c.out.performanceTime })),
      base_latency: audioRec.ctx.baseLatency, output_latency: audioRec.ctx.outputLatency,
    };
  }

  // ---------------------------------------------------------------------------------------
  // Wiring

  $("start").addEventListener("click", () => start().catch(() => {}));
  $("stop").addEventListener("click", () => stop());
  $("interrupt").addEventListener("click", () => interrupt());
  $("mute").addEventListener("change", () => { $("avatar").muted = $("mute").checked; });
  $("avatar").addEventListener("click", () => $("avatar").play().catch(() => {}));
  setPhase("idle");

  window.avatarserve = {
    start, stop, interrupt, openMicrophone,
    status: () => ({
      phase: st.phase, ice: st.ice, connection: st.conn, session_id: st.sessionId, geometry: st.geometry,
      fps: st.fps, stats_fps: st.statsFps, frames_decoded: st.framesDecoded, frames_received: st.framesReceived,
      freezes: st.freezes, freezes_ms: st.freezesMs, frames: st.frames,
      latency_ms: st.latencyMs, gen_ms: st.genMs, jitter_buffer_ms: st.jitterBufferMs,
      packets_lost: st.lost, frames_dropped: st.dropped, showing: st.showing, error: st.error,
      first_frame_at: st.firstFrameAt, now: performance.now(), time_origin: performance.timeOrigin,
      timing: st.timing,
    }),
    messages: (since = 0) => st.messages.filter((m) => m.t >= since),
    frameMarks: () => st.frameMarks.slice(),
    diag: {
      startCapture: (max = 3000) => { capture.frames = []; capture.max = max; capture.on = true; },
      stopCapture: () => { capture.on = false; return capture.frames.length; },
      // frames [from, from + count) with their RGB as base64
      takeFrames: (from = 0, count = 50) => capture.frames.slice(from, from + count).map((f) => {
        const { rgb, ...rest } = f;
        return { ...rest, rgb: b64(rgb) };
      }),
      capturedCount: () => capture.frames.length,
      recordAudio,
      takeAudio,
      takePlayout: () => playout.samples.splice(0),
      markFor,
    },
  };
})();
