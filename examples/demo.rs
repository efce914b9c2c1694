//! Placeholder until discovery lands: starts a local etcd and says so.

fn main() {
    let etcd = tonic_etcd::testing::Etcd::start();
    println!("local etcd is up at {}", etcd.endpoint());
    println!("the demo (servers registering, a client dialing by name) is not there yet");
}
