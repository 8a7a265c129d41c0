// Reading QR codes from the camera: the browser's BarcodeDetector where it has one that reads
// QR codes (Chrome on Android and macOS), otherwise jsQR (vendor/jsQR.js, pinned from npm:
// see api/static/vendor-src/) on frames drawn to a canvas. Both run offline.

// Frames longer than this are shrunk by a whole factor (2, 3...) before jsQR reads them, so
// a phone stays responsive. A whole factor matters: a voucher's QR code is dense, and
// resampling by, say, 0.83 blurs its modules past what jsQR reads (measured: a 960x720 frame
// reads at 1/1 and 1/1.5, not at 1/1.2).
const MAX_SIDE_PX = 1280;
const INTERVAL_MS = 120;

async function barcodeDetector() {
  if (!("BarcodeDetector" in self)) return null;
  try {
    const formats = await self.BarcodeDetector.getSupportedFormats();
    if (!formats.includes("qr_code")) return null;
    const detector = new self.BarcodeDetector({ formats: ["qr_code"] });
    return async (video) => {
      const codes = await detector.detect(video);
      return codes.length ? codes[0].rawValue : null;
    };
  } catch {
    return null; // present but unusable (no platform support): fall back to jsQR
  }
}

async function jsqrReader() {
  // The published UMD file, unchanged: loaded as a module it defines `self.jsQR`.
  await import("./vendor/jsQR.js");
  const jsQR = self.jsQR;
  const canvas = document.createElement("canvas");
  const context = canvas.getContext("2d", { willReadFrequently: true });
  return async (video) => {
    const w = video.videoWidth;
    const h = video.videoHeight;
    if (!w || !h) return null;
    const scale = 1 / Math.ceil(Math.max(w, h) / MAX_SIDE_PX);
    canvas.width = Math.round(w * scale);
    canvas.height = Math.round(h * scale);
    context.drawImage(video, 0, 0, canvas.width, canvas.height);
    const image = context.getImageData(0, 0, canvas.width, canvas.height);
    const code = jsQR(image.data, image.width, image.height, { inversionAttempts: "dontInvert" });
    return code ? code.data : null;
  };
}

/** The camera in a <video>, read until a QR code is found. */
export class Scanner {
  constructor(video) {
    this.video = video;
    this.stream = null;
    this.timer = null;
    this.decoderName = null;
  }

  get running() {
    return this.stream !== null;
  }

  /** Open the camera; call `onCode(text)` once with the first code read (then stop). */
  async start(onCode) {
    this.stop();
    const stream = await navigator.mediaDevices.getUserMedia({
      video: { facingMode: { ideal: "environment" } },
      audio: false,
    });
    this.stream = stream;
    this.video.srcObject = stream;
    await this.video.play();
    let read = await barcodeDetector();
    this.decoderName = "BarcodeDetector";
    if (!read) {
      read = await jsqrReader();
      this.decoderName = "jsQR";
    }
    const tick = async () => {
      if (this.stream !== stream) return; // stopped meanwhile
      let text = null;
      try {
        text = await read(this.video);
      } catch {
        text = null; // a frame that could not be read: try the next one
      }
      if (this.stream !== stream) return;
      if (text) {
        this.stop();
        onCode(text);
      } else {
        this.timer = setTimeout(tick, INTERVAL_MS);
      }
    };
    this.timer = setTimeout(tick, 0);
  }

  stop() {
    clearTimeout(this.timer);
    this.timer = null;
    if (this.stream) {
      for (const track of this.stream.getTracks()) track.stop();
    }
    this.stream = null;
    this.video.srcObject = null;
  }
}
