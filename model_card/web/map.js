// An offline world map: an equirectangular canvas with a graticule, the candidate cities as grey dots (at a few
// hundred cities they trace the inhabited world), the answers as numbered pins and, for one photo, the circle around its
// best answer that holds config.confidence_level of the posterior, as the Space draws it. No tile server is asked.

import { EARTH_RADIUS_KM } from "./decisions.js";

export const PIN_COLOR = "#e4572e";
// The Space's REGION_COLOR.
const REGION_COLOR = "#08519c";
const CIRCLE_STEPS = 361;
const BEST_PIN_RADIUS = 7;
const PIN_RADIUS = 4;

export class WorldMap {
  constructor(canvas, table) {
    this.canvas = canvas;
    this.context = canvas.getContext("2d");
    this.table = table;
    this.background = this.#drawBackground();
  }

  #point(latitude, longitude) {
    return [((longitude + 180) / 360) * this.canvas.width, ((90 - latitude) / 180) * this.canvas.height];
  }

  #drawBackground() {
    const { context, canvas, table } = this;
    context.fillStyle = "#dde8f0";
    context.fillRect(0, 0, canvas.width, canvas.height);
    context.strokeStyle = "#c3d3df";
    context.lineWidth = 1;
    for (let longitude = -180; longitude <= 180; longitude += 30) {
      const [x] = this.#point(0, longitude);
      context.beginPath();
      context.moveTo(x, 0);
      context.lineTo(x, canvas.height);
      context.stroke();
    }
    for (let latitude = -90; latitude <= 90; latitude += 30) {
      const [, y] = this.#point(latitude, 0);
      context.beginPath();
      context.moveTo(0, y);
      context.lineTo(canvas.width, y);
      context.stroke();
    }
    context.fillStyle = "#7d8b96";
    table.city_latitudes.forEach((latitude, row) => {
      const [x, y] = this.#point(latitude, table.city_longitudes[row]);
      context.fillRect(x - 1, y - 1, 2, 2);
    });
    return context.getImageData(0, 0, canvas.width, canvas.height);
  }

  // The circle of `radiusKm` around a point on the sphere, dashed, broken where it crosses the map's edge.
  #drawCircle(latitude, longitude, radiusKm) {
    const { context } = this;
    const angle = Math.min(radiusKm / EARTH_RADIUS_KM, Math.PI);
    const [phi, lambda] = [(latitude * Math.PI) / 180, (longitude * Math.PI) / 180];
    context.beginPath();
    let previous = null;
    for (let step = 0; step < CIRCLE_STEPS; step += 1) {
      const bearing = (2 * Math.PI * step) / (CIRCLE_STEPS - 1);
      const pointPhi = Math.asin(Math.sin(phi) * Math.cos(angle) + Math.cos(phi) * Math.sin(angle) * Math.cos(bearing));
      const pointLambda = lambda + Math.atan2(Math.sin(bearing) * Math.sin(angle) * Math.cos(phi), Math.cos(angle) - Math.sin(phi) * Math.sin(pointPhi));
      const pointLongitude = ((((pointLambda * 180) / Math.PI + 180) % 360) + 360) % 360 - 180;
      const [x, y] = this.#point((pointPhi * 180) / Math.PI, pointLongitude);
      if (previous === null || Math.abs(pointLongitude - previous) > 180) context.moveTo(x, y);
      else context.lineTo(x, y);
      previous = pointLongitude;
    }
    context.strokeStyle = REGION_COLOR;
    context.lineWidth = 2;
    context.setLineDash([6, 4]);
    context.stroke();
    context.setLineDash([]);
  }

  // Pins for each photo's answers (`photos`: [{number, answers, region}]): the first answer large and numbered, and
  // for one photo the circle of its region.
  show(photos) {
    const { context } = this;
    context.putImageData(this.background, 0, 0);
    if (photos.length === 1) {
      const [{ answers, region }] = photos;
      this.#drawCircle(answers[0].latitude, answers[0].longitude, region.radiusKm);
    }
    for (const { number, answers } of photos) {
      answers.forEach((answer, rank) => {
        const [x, y] = this.#point(answer.latitude, answer.longitude);
        context.beginPath();
        context.arc(x, y, rank === 0 ? BEST_PIN_RADIUS : PIN_RADIUS, 0, 2 * Math.PI);
        context.fillStyle = PIN_COLOR;
        context.globalAlpha = rank === 0 ? 1 : 0.55;
        context.fill();
        context.globalAlpha = 1;
        if (rank === 0) {
          context.fillStyle = "#1b1b1b";
          context.font = "bold 12px sans-serif";
          context.fillText(String(number), x + BEST_PIN_RADIUS + 2, y + 4);
        }
      });
    }
  }
}
