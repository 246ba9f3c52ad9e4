// A minimal multichat server in Go on gorilla/websocket, for comparison.
//
// It is the compiled yardstick chatd's fan-out is measured against
// (scripts/bench_peers.py), beside the Python websockets peer and the Node
// ws peer, and behaves like them: the multichat protocol only, in one
// lobby. The first frame must be a `register` carrying a non-empty
// `client-name` and the shared `secret-key` (compared in constant time),
// else the connection is closed with 1008; after it each `client-message`
// with a non-empty string `content` goes to every other registered client
// as one `forwarding-message`. A frame over 4096 bytes closes with 1009
// (chatd's default `max-frame-bytes`); no compression is negotiated.
//
// Two ways of writing, chosen by --mode:
//
//   - `gorilla` (bench name go-ws): the message is framed once
//     (websocket.PreparedMessage) and queued to each recipient's writer
//     goroutine, which writes it with WritePreparedMessage: one write(2)
//     per delivery, the way a careful gorilla server is written.
//   - `coalesce` (bench name go-coalesce): the frame is built once as
//     bytes and appended to each recipient's pending buffer; the
//     recipient's writer goroutine takes everything pending and writes it
//     with one write(2), so under load one write carries many frames.
//
// In both a recipient whose queue is full (a slow consumer) is cut off.
//
//	go-ws --port 8768 --secret-key s3cret [--mode coalesce] [--tls-cert C --tls-key K]
//
// It prints `listening on ws://HOST:PORT` (or wss://) on stderr once it
// accepts connections and stops on SIGINT/SIGTERM. Built by
// scripts/loadgen/gobuild.py from Debian's golang-go and
// golang-github-gorilla-websocket-dev (GOPATH mode, no network).
package main

import (
	"crypto/subtle"
	"crypto/tls"
	"encoding/json"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"sync"
	"syscall"
	"time"

	"github.com/gorilla/websocket"
)

// Like chatd's default max-frame-bytes: larger frames close with 1009.
const maxFrameBytes = 4096

// A recipient with this many undelivered messages (gorilla) or bytes
// (coalesce) is a slow consumer and is cut off.
const (
	maxQueuedMessages = 1024
	maxPendingBytes   = 1 << 20
)

type client struct {
	ws   *websocket.Conn
	name string
	// gorilla mode: prepared messages for the writer goroutine.
	queue chan *websocket.PreparedMessage
	// coalesce mode: frames not yet written, and a wake-up for the writer.
	mu      sync.Mutex
	pending []byte
	spare   []byte
	wake    chan struct{}
	dead    bool
}

type lobby struct {
	mu       sync.RWMutex
	members  map[*client]struct{}
	secret   []byte
	coalesce bool
}

type frame struct {
	Action  string  `json:"action"`
	Name    *string `json:"client-name"`
	Secret  *string `json:"secret-key"`
	Content *string `json:"content"`
}

type forwarding struct {
	Action  string `json:"action"`
	Source  string `json:"source-client-name"`
	Content string `json:"content"`
}

var upgrader = websocket.Upgrader{
	ReadBufferSize:  4096,
	WriteBufferSize: 4096,
	CheckOrigin:     func(*http.Request) bool { return true },
}

func (l *lobby) serveWS(w http.ResponseWriter, r *http.Request) {
	ws, err := upgrader.Upgrade(w, r, nil)
	if err != nil {
		return
	}
	ws.SetReadLimit(maxFrameBytes)
	c := &client{ws: ws}
	_, data, err := ws.ReadMessage()
	if err != nil {
		ws.Close()
		return
	}
	name, ok := l.register(data)
	if !ok {
		msg := websocket.FormatCloseMessage(websocket.ClosePolicyViolation,
			"first frame must be a valid register")
		ws.WriteControl(websocket.CloseMessage, msg, time.Now().Add(time.Second))
		// Wait for the client's close frame (or give up), then drop TCP.
		ws.SetReadDeadline(time.Now().Add(2 * time.Second))
		for {
			if _, _, err := ws.NextReader(); err != nil {
				break
			}
		}
		ws.Close()
		return
	}
	c.name = name
	if l.coalesce {
		c.wake = make(chan struct{}, 1)
		go c.coalescingWriter()
	} else {
		c.queue = make(chan *websocket.PreparedMessage, maxQueuedMessages)
		go c.preparedWriter()
	}
	ack := []byte(`{"action":"register-ack"}`)
	if l.coalesce {
		c.send(true, textFrame(ack), nil)
	} else if pm, err := websocket.NewPreparedMessage(websocket.TextMessage, ack); err == nil {
		c.send(false, nil, pm)
	}
	l.mu.Lock()
	l.members[c] = struct{}{}
	l.mu.Unlock()
	defer func() {
		l.mu.Lock()
		delete(l.members, c)
		l.mu.Unlock()
		c.stop(l.coalesce)
		ws.Close()
	}()
	for {
		_, data, err := ws.ReadMessage()
		if err != nil {
			return
		}
		l.forward(c, data)
	}
}

func (l *lobby) register(data []byte) (string, bool) {
	var f frame
	if json.Unmarshal(data, &f) != nil || f.Action != "register" {
		return "", false
	}
	if f.Name == nil || *f.Name == "" || f.Secret == nil {
		return "", false
	}
	if subtle.ConstantTimeCompare([]byte(*f.Secret), l.secret) != 1 {
		return "", false
	}
	return *f.Name, true
}

func (l *lobby) forward(sender *client, data []byte) {
	var f frame
	if json.Unmarshal(data, &f) != nil || f.Action != "client-message" {
		return // ignored, as multichat does after registration
	}
	if f.Content == nil || *f.Content == "" {
		return
	}
	out, err := json.Marshal(forwarding{"forwarding-message", sender.name, *f.Content})
	if err != nil {
		return
	}
	var prepared *websocket.PreparedMessage
	var framed []byte
	if l.coalesce {
		framed = textFrame(out)
	} else if prepared, err = websocket.NewPreparedMessage(websocket.TextMessage, out); err != nil {
		return
	}
	l.mu.RLock()
	for c := range l.members {
		if c != sender {
			c.send(l.coalesce, framed, prepared)
		}
	}
	l.mu.RUnlock()
}

// textFrame is one final unmasked text frame (RFC 6455 section 5.2).
func textFrame(payload []byte) []byte {
	n := len(payload)
	var head []byte
	switch {
	case n < 126:
		head = []byte{0x81, byte(n)}
	case n < 1<<16:
		head = []byte{0x81, 126, byte(n >> 8), byte(n)}
	default:
		head = []byte{0x81, 127, 0, 0, 0, 0, byte(n >> 24), byte(n >> 16), byte(n >> 8), byte(n)}
	}
	return append(head, payload...)
}

// send queues one message for c: a ready frame (coalesce mode) or a
// prepared message (gorilla mode).
func (c *client) send(coalesce bool, framed []byte, prepared *websocket.PreparedMessage) {
	if coalesce {
		if framed == nil {
			return
		}
		c.mu.Lock()
		if c.dead {
			c.mu.Unlock()
			return
		}
		if len(c.pending)+len(framed) > maxPendingBytes {
			c.dead = true
			c.mu.Unlock()
			c.ws.UnderlyingConn().Close() // a slow consumer is cut off
			return
		}
		c.pending = append(c.pending, framed...)
		c.mu.Unlock()
		select {
		case c.wake <- struct{}{}:
		default:
		}
		return
	}
	select {
	case c.queue <- prepared:
	default:
		c.ws.UnderlyingConn().Close() // a slow consumer is cut off
	}
}

func (c *client) preparedWriter() {
	for pm := range c.queue {
		if pm == nil {
			return
		}
		if c.ws.WritePreparedMessage(pm) != nil {
			c.ws.UnderlyingConn().Close()
			for range c.queue { // drain until stop
			}
			return
		}
	}
}

func (c *client) coalescingWriter() {
	conn := c.ws.UnderlyingConn()
	for range c.wake {
		c.mu.Lock()
		out := c.pending
		c.pending, c.spare = c.spare[:0], nil
		dead := c.dead
		c.mu.Unlock()
		if dead {
			return
		}
		if len(out) == 0 {
			continue
		}
		if _, err := conn.Write(out); err != nil {
			conn.Close()
			return
		}
		c.mu.Lock()
		if c.spare == nil {
			c.spare = out[:0] // reuse the buffer for the next batch
		}
		c.mu.Unlock()
	}
}

func (c *client) stop(coalesce bool) {
	if coalesce {
		c.mu.Lock()
		c.dead = true
		c.mu.Unlock()
		select {
		case c.wake <- struct{}{}:
		default:
		}
		return
	}
	select {
	case c.queue <- nil:
	default:
	}
}

func main() {
	host := flag.String("host", "127.0.0.1", "address to listen on")
	port := flag.Int("port", 8768, "port (0 picks a free one)")
	secret := flag.String("secret-key", "", "multichat shared secret (required)")
	mode := flag.String("mode", "gorilla", "gorilla (one write per delivery) or coalesce")
	cert := flag.String("tls-cert", "", "PEM certificate: serve wss")
	key := flag.String("tls-key", "", "PEM private key for --tls-cert")
	flag.Parse()
	if *secret == "" || (*mode != "gorilla" && *mode != "coalesce") {
		fmt.Fprintln(os.Stderr, "usage: go-ws --secret-key KEY [--port PORT] [--mode gorilla|coalesce]")
		os.Exit(2)
	}
	l := &lobby{members: map[*client]struct{}{}, secret: []byte(*secret),
		coalesce: *mode == "coalesce"}
	listener, err := net.Listen("tcp", net.JoinHostPort(*host, fmt.Sprint(*port)))
	if err != nil {
		fmt.Fprintf(os.Stderr, "go-ws peer: %v\n", err)
		os.Exit(1)
	}
	scheme := "ws"
	if *cert != "" {
		pair, err := tls.LoadX509KeyPair(*cert, *key)
		if err != nil {
			fmt.Fprintf(os.Stderr, "go-ws peer: %v\n", err)
			os.Exit(1)
		}
		listener = tls.NewListener(listener, &tls.Config{Certificates: []tls.Certificate{pair},
			NextProtos: []string{"http/1.1"}})
		scheme = "wss"
	}
	server := &http.Server{Handler: http.HandlerFunc(l.serveWS)}
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGINT, syscall.SIGTERM)
	go func() {
		<-stop
		listener.Close()
		l.mu.RLock()
		for c := range l.members {
			msg := websocket.FormatCloseMessage(websocket.CloseGoingAway, "server shutting down")
			c.ws.WriteControl(websocket.CloseMessage, msg, time.Now().Add(time.Second))
		}
		l.mu.RUnlock()
		time.Sleep(200 * time.Millisecond)
		os.Exit(0)
	}()
	fmt.Fprintf(os.Stderr, "listening on %s://%s\n", scheme, listener.Addr())
	server.Serve(listener)
}
