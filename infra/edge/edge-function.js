// Sketch of an edge function (Cloudflare Worker style) that hands the browser the URL of
// the closest READY prscd node, read from any region's GET /v1/nodes directory.
const DIRECTORY = 'https://presence.example.com/v1/nodes';
const PREFERENCE = { // the user's continent -> regions, nearest first
  NA: ['us-east', 'eu-west', 'ap-south'],
  EU: ['eu-west', 'us-east', 'ap-south'],
  AS: ['ap-south', 'eu-west', 'us-east'],
};

export default {
  async fetch(request) {
    const continent = request.cf?.continent || 'NA';
    const { nodes } = await (await fetch(DIRECTORY, { cf: { cacheTtl: 2 } })).json();
    const ready = nodes.filter((n) => n.ready && n.url);
    for (const region of PREFERENCE[continent] || PREFERENCE.NA) {
      // Several nodes may share a region: take the least loaded.
      const here = ready.filter((n) => n.mesh === region).sort((a, b) => a.peers - b.peers);
      if (here.length) return Response.json({ url: here[0].url, mesh: region });
    }
    return new Response('no ready region', { status: 503 });
  },
};
